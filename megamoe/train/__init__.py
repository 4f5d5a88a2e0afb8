"""The training run (L4): start-up checks, the DeepSpeed engine and optimizer, the loop and pipeline schedule,
checkpoints and their integrity, metrics, preemption and the stall watchdog. Benchmarks and studies live in
megamoe.studies, conversions in megamoe.convert, the planner in megamoe.moe.plan.

Empty on purpose: `megamoe.train.startup` must stay importable without loading megatron or DeepSpeed.
"""
