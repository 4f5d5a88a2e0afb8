"""Hugging Face interchange: megamoe state dicts <-> transformers models (no megatron, no DeepSpeed)."""
