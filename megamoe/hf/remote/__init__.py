"""Hugging Face custom code for megamoe models without a native transformers class (DA-MoE, PEER, CartesianMoE,
MPOE, and top-k options Mixtral/Qwen2-MoE lack). `megamoe.hf.custom` copies these files into an exported
directory, where `trust_remote_code=True` loads them: they import only torch, transformers and each other."""
