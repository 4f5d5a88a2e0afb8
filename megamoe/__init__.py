"""megamoe: Mixture-of-Experts language-model training on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
