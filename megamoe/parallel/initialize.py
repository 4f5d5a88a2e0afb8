"""Start the default process group and megatron-core's model-parallel groups; the sole caller of
megatron's parallel_state."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megamoe import platform
from megamoe.config import ParallelConfig
from megamoe.parallel.groups import ParallelGroups
from megamoe.parallel.launch import world_of_one
from megamoe.utils import get_logger


def init_default_group(timeout_minutes: float) -> None:
    """The world group from the launcher's environment (NCCL on GPUs, gloo on CPU); without a launcher
    (`python launchers/pretrain.py ...`) a world of one process."""
    if dist.is_initialized():
        return
    world_of_one()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _share_cpu_cores()
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def _share_cpu_cores() -> None:
    # The deepspeed launcher, unlike torchrun, does not set OMP_NUM_THREADS: N ranks x all cores
    # oversubscribe the CPU (docs/integration.md §13). Split the cores unless the user chose.
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE")  # torchrun
                      or os.environ.get("LOCAL_SIZE")  # deepspeed launcher
                      or os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local_world)))


def initialize(par: ParallelConfig, seed: int) -> ParallelGroups:
    """Process groups for `par` (patching megatron for CPU first when there is no GPU) and seeded RNGs."""
    platform.apply()
    init_default_group(par.distributed_timeout_minutes)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=par.distributed_timeout_minutes,  # annotated int; int() made 0.5 zero
    )
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    groups = _groups(par.sequence_parallel)
    get_logger().info(f"world {dist.get_world_size()} ({dist.get_backend()}): TP={groups.tp_size} "
                      f"PP={groups.pp_size} DP={groups.dp_size} EP={groups.ep_size}, platform patches: "
                      f"{platform.apply() or 'none (CUDA)'}")
    return groups


def _groups(sequence_parallel: bool) -> ParallelGroups:
    from megatron.core import parallel_state as ps

    def group_or_none(group):  # size-1 groups become None: nothing to communicate
        return group if dist.get_world_size(group) > 1 else None

    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    return ParallelGroups(
        tp_group=group_or_none(ps.get_tensor_model_parallel_group()),
        dp_group=group_or_none(ps.get_data_parallel_group()),
        ep_group=group_or_none(ps.get_expert_model_parallel_group()),
        edp_group=group_or_none(ps.get_expert_data_parallel_group()),
        tp_dp_group=group_or_none(ps.get_tensor_and_data_parallel_group()),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        sequence_parallel=sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1,
        pp_group=group_or_none(ps.get_pipeline_model_parallel_group()),
        pp_rank=pp_rank, pp_size=pp_size,
        pp_prev=ps.get_pipeline_model_parallel_prev_rank() if pp_rank > 0 else None,
        pp_next=ps.get_pipeline_model_parallel_next_rank() if pp_rank < pp_size - 1 else None,
    )


def seed_everything(seed: int) -> None:
    """Python, numpy and torch generators. Every rank draws the same initial weights (megatron
    initialises the full weight on CPU and keeps its shard, so any TP size gives the same model)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def destroy() -> None:
    """Tear down megatron's groups and the world group (at the end of a run; every rank calls it)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
