"""Autograd-aware collectives with explicit groups (a group of None means a single rank: identity).

Shapes: R rows; D feature dims. Every rank of `group` must call each collective, even with 0 rows,
or the group hangs (Megatron-LM issue #5749).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single; its backward is the reverse exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x_RD.new_empty((sum(output_splits), *x_RD.shape[1:]))
        dist.all_to_all_single(out, x_RD.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad_RD.new_empty((sum(input_splits), *grad_RD.shape[1:]))
        dist.all_to_all_single(grad_in, grad_RD.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_RD: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """Send input_splits[r] rows to rank r, receive output_splits[r] rows from rank r (Python ints)."""
    if group is None:
        return x_RD
    return _AllToAll.apply(x_RD, output_splits, input_splits, group)


def exchange_counts(counts: Tensor, group) -> Tensor:
    """all_to_all of equal-sized count blocks (no gradient): counts.view(world, -1)[r] goes to rank r."""
    if group is None:
        return counts
    out = torch.empty_like(counts)
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
