"""Autograd-aware collectives with explicit groups (a group of None means a single rank: identity).

Shapes: R rows; D feature dims. Every rank of `group` must call each collective, even with 0 rows,
or the group hangs (Megatron-LM issue #5749).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megamoe.profiling import region


@dataclass(eq=False)  # meters are told apart by identity: nested metered() blocks remove their own
class TrafficMeter:
    """Bytes this rank sent through all_to_all (forward and backward) while the meter was on."""

    to_other_ranks: int = 0
    to_itself: int = 0
    """The block a rank keeps: an all_to_all copies it locally, nothing crosses the network."""

    def add(self, input_splits: list[int], row_bytes: int, group) -> None:
        own = dist.get_rank(group)
        self.to_itself += input_splits[own] * row_bytes
        self.to_other_ranks += (sum(input_splits) - input_splits[own]) * row_bytes


# Process-wide, not a context variable: on GPUs autograd runs backward on its own device threads.
_METERS: list[TrafficMeter] = []


@contextlib.contextmanager
def metered() -> Iterator[TrafficMeter]:
    """Count the all-to-all traffic of the code inside, backward included (planner validation, benchmarks)."""
    meter = TrafficMeter()
    _METERS.append(meter)
    try:
        yield meter
    finally:
        _METERS.remove(meter)


def _count(splits: list[int], x_RD: Tensor, group) -> None:
    for meter in _METERS:
        meter.add(splits, x_RD[0].numel() * x_RD.element_size() if x_RD.shape[0] else 0, group)


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single; its backward is the reverse exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x_RD.new_empty((sum(output_splits), *x_RD.shape[1:]))
        _count(input_splits, x_RD, group)
        dist.all_to_all_single(out, x_RD.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad_RD.new_empty((sum(input_splits), *grad_RD.shape[1:]))
        _count(output_splits, grad_RD, ctx.group)
        dist.all_to_all_single(grad_in, grad_RD.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_RD: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """Send input_splits[r] rows to rank r, receive output_splits[r] rows from rank r (Python ints)."""
    if group is None:
        return x_RD
    with region("moe/all_to_all"):
        return _AllToAll.apply(x_RD, output_splits, input_splits, group)


def exchange_counts(counts: Tensor, group) -> Tensor:
    """all_to_all of equal-sized count blocks (no gradient): counts.view(world, -1)[r] goes to rank r."""
    if group is None:
        return counts
    out = torch.empty_like(counts)
    with region("moe/all_to_all"):
        dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


class _ReduceInBackward(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient over `group` in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def reduce_grad(param: Tensor, group) -> Tensor:
    """Use a replicated parameter whose ranks see different tokens (sequence parallelism): every rank
    gets the full gradient, summed over `group`, inside autograd (so any engine sees it)."""
    if group is None:
        return param
    return _ReduceInBackward.apply(param, group)


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """In-place sum over `group` of a statistic (no gradient)."""
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order; backward: each rank gets the sum of every rank's gradient
    for its own rows (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, group) -> Tensor:
        ctx.group = group
        out = x_RD.new_empty((dist.get_world_size(group) * x_RD.shape[0], *x_RD.shape[1:]))
        dist.all_gather_into_tensor(out, x_RD.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad_GD: Tensor):
        return _reduce_scatter(grad_GD, ctx.group), None


class _ReduceScatterRows(torch.autograd.Function):
    """Sum over ranks, each keeping its own block of rows; backward: all-gather."""

    @staticmethod
    def forward(ctx, x_GD: Tensor, group) -> Tensor:
        ctx.group = group
        return _reduce_scatter(x_GD, group)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        out = grad_RD.new_empty((dist.get_world_size(ctx.group) * grad_RD.shape[0], *grad_RD.shape[1:]))
        dist.all_gather_into_tensor(out, grad_RD.contiguous(), group=ctx.group)
        return out, None


def _reduce_scatter(x_GD: Tensor, group) -> Tensor:
    out = x_GD.new_empty((x_GD.shape[0] // dist.get_world_size(group), *x_GD.shape[1:]))
    dist.reduce_scatter_tensor(out, x_GD.contiguous(), group=group)
    return out


def gather_rows(x_RD: Tensor, group) -> Tensor:
    """Every rank's rows (equal counts), in rank order, with autograd."""
    return x_RD if group is None else _GatherRows.apply(x_RD, group)


def reduce_scatter_rows(x_GD: Tensor, group) -> Tensor:
    """Sum of every rank's x_GD, this rank's block of rows only, with autograd."""
    return x_GD if group is None else _ReduceScatterRows.apply(x_GD, group)


def gather_values(x_R: Tensor, group) -> Tensor:
    """Every rank's values (equal counts) in rank order, no gradient (masks, indices)."""
    if group is None:
        return x_R
    out = x_R.new_empty((dist.get_world_size(group) * x_R.shape[0], *x_R.shape[1:]))
    dist.all_gather_into_tensor(out, x_R.contiguous(), group=group)
    return out
