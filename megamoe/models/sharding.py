"""Tensor-parallel shards <-> full tensors, from the attributes megatron puts on every parameter.

megatron marks a sharded parameter with `tensor_model_parallel=True`, the split axis `partition_dim` and
`partition_stride`: with stride s the full tensor is cut into TP*s chunks and rank r holds chunks
r, r+TP, r+2TP, ... (SwiGLU's fc1 uses s=2 so each rank holds matching gate and up rows). A pipeline stage
numbers its decoder layers from 0; `shift_layer_index` gives their global names.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megamoe.parallel.groups import ParallelGroups


def _is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def gather_tp(shard: torch.Tensor, param: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """The full tensor of which `shard` is this rank's part (`param` carries the partition attributes)."""
    if groups.tp_size == 1 or not _is_sharded(param):
        return shard
    shards = [torch.empty_like(shard) for _ in range(groups.tp_size)]
    dist.all_gather(shards, shard.contiguous(), group=groups.tp_group)
    return merge_tp(shards, param)


def merge_tp(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The full tensor from every TP rank's shard, in rank order (`param` carries the partition attributes)."""
    if len(shards) == 1 or not _is_sharded(param):
        return shards[0]
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = [shard_r.chunk(stride, dim=dim) for shard_r in shards]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def shard_tp(full: torch.Tensor, param: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """This rank's part of `full`, laid out as `param`."""
    if groups.tp_size == 1 or not _is_sharded(param):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.chunk(groups.tp_size * stride, dim=dim)
    return torch.cat(chunks[groups.tp_rank::groups.tp_size], dim=dim)


def full_state_dict(model: torch.nn.Module, groups: ParallelGroups,
                    grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) as a full, unsharded copy, on every TP rank."""
    out = {}
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param.data
        if tensor is None:
            tensor = torch.zeros_like(param)
        out[name] = gather_tp(tensor.detach(), param, groups).clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], groups: ParallelGroups) -> None:
    """Copy full tensors into this rank's shards; every parameter must be given, with its full shape."""
    params = dict(model.named_parameters())
    if missing := sorted(params.keys() - full.keys()):
        raise KeyError(f"{len(missing)} parameters missing from the full state dict, e.g. {missing[:3]}")
    for name, param in params.items():
        param.copy_(shard_tp(full[name], param, groups))


_LAYER_PREFIX = re.compile(r"^decoder\.layers\.(\d+)\.")


def shift_layer_index(name: str, offset: int) -> str:
    """`decoder.layers.<i>.x` -> `decoder.layers.<i + offset>.x` (other names unchanged): a pipeline stage numbers
    its layers from 0, checkpoints and exports by their global index (offset = the stage's first layer)."""
    match = _LAYER_PREFIX.match(name)
    if match is None or offset == 0:
        return name
    return f"decoder.layers.{int(match[1]) + offset}.{name[match.end():]}"


def layer_index(name: str) -> int | None:
    """The layer index in `decoder.layers.<i>.x`, or None for names outside the decoder layers."""
    match = _LAYER_PREFIX.match(name)
    return None if match is None else int(match[1])
