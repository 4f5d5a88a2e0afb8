"""Everything DeepSpeed: the generated config, the mpu adapter over megatron's groups, the engine."""

from __future__ import annotations

import copy
import logging
from typing import Any

import deepspeed
import torch
from deepspeed.utils import logger as ds_logger
from megatron.core import parallel_state

from megamoe.config import Layout, RunConfig
from megamoe.train.optim import build_optimizer, lr_scheduler_factory, param_groups


def to_deepspeed_config(cfg: RunConfig, layout: Layout) -> dict[str, Any]:
    """The DeepSpeed JSON config for `cfg`; deepspeed.extra is merged over it (validated not to clash)."""
    train = cfg.train
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage in (1, 2):
        # DeepSpeed requires both for MoE under ZeRO-2 and warns without them for ZeRO-1.
        zero.update(contiguous_gradients=True, reduce_scatter=True)
    generated = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        "gradient_clipping": train.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # megamoe passes torch/apex AdamW as a client optimizer
        "bf16": {"enabled": train.bf16},
        "fp16": {"enabled": train.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # megamoe logs itself
        "wall_clock_breakdown": False,
    }
    return _merge(generated, cfg.deepspeed.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class MegatronMPU:
    """megatron-core's parallel_state through the `mpu` interface DeepSpeed reads (Megatron-DeepSpeed's).

    DeepSpeed's "model parallel" group is megatron's tensor-parallel group: ZeRO reduces over the
    data-parallel group only, counts TP-sharded gradients (tensor_model_parallel=True) on every TP rank
    and replicated ones on TP rank 0 when computing the global norm, and names checkpoint files by TP rank.
    """

    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)


def grad_norm_before_step(engine: deepspeed.DeepSpeedEngine) -> float | None:
    """The global gradient norm where DeepSpeed does not report one (ZeRO-0 in fp32 clips without keeping
    it). Call after the last backward of a step, before engine.step(); None where DeepSpeed reports it."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    from deepspeed.runtime.utils import get_flattened_grad_norm, is_model_parallel_parameter

    # Each TP rank holds its own shard of a TP-parallel weight but a copy of a replicated one (norms):
    # count the copies once, as DeepSpeed's clipping does.
    tp_rank = engine.mpu.get_model_parallel_rank()
    params = [p for p in engine.module.parameters() if tp_rank == 0 or is_model_parallel_parameter(p)]
    return float(get_flattened_grad_norm(params, mpu=engine.mpu))


def build_engine(model: torch.nn.Module, cfg: RunConfig, layout: Layout) -> deepspeed.DeepSpeedEngine:
    """deepspeed.initialize with megamoe's optimizer, LR schedule and megatron's groups."""
    ds_logger.setLevel(logging.WARNING)
    optimizer = build_optimizer(param_groups(model), cfg.train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler_factory(cfg.train),
        mpu=MegatronMPU(), config=to_deepspeed_config(cfg, layout), dist_init_required=False)
    return engine
