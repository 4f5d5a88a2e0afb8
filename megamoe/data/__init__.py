"""Tokenizer, preprocessing and data loaders: glue over megatron.core.datasets (L3)."""
