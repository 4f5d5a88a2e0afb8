"""Training: the DeepSpeed engine, optimizer, checkpoints, metrics and the loop (L4).

Empty on purpose: `megamoe.train.startup` must stay importable without loading megatron or DeepSpeed.
"""
