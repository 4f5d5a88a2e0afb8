"""megatron-core models and the adapters that plug megamoe layers into them (L3)."""
