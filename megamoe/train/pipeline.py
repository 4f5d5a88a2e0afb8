"""Pipeline parallelism: a 1F1B schedule over one DeepSpeed engine per pipeline stage.

Each stage is an ordinary DeepSpeed engine (ZeRO 1 or 2) over its megatron GPTModel chunk (embedding on the
first stage, final norm, output layer and loss on the last). A micro-batch's backward on the last stage is
`engine.backward(loss)` (DeepSpeed divides by the accumulation steps); on an inner stage it is
`engine.backward((y * dy).sum(), scale_wrt_gas=False)`: the gradient of that scalar with respect to the
stage output y is exactly dy, the gradient the next stage sent (already divided). So every stage keeps
DeepSpeed's contract — one backward and one step() per micro-batch, the optimizer stepping at the accumulation
boundary — and megamoe's own micro-batch hooks (aux-loss scale, MPOE's once-per-step rebuild) run unchanged.
Aux losses need nothing from other stages: each MoE layer injects its loss gradient into its own stage's
backward.

Why not the alternatives (docs/integration.md §7): DeepSpeed's PipelineEngine replaces backward/step by
train_batch() (no per-micro-batch hooks, no token-weighted loss), needs the model as a flat LayerSpec list
(megatron's GPTModel stage split does not fit) and caps ZeRO at stage 1; megatron-core's schedules run their
own backward outside DeepSpeed's engine, whose ZeRO gradient bookkeeping (micro-step counter, accumulation
boundary, partitioned gradients) would then be bypassed.

Schedule: non-interleaved 1F1B (PipeDream-Flush, arXiv:2006.09503): stage s runs P - s - 1 warm-up forwards,
then alternates one forward and one backward, then drains; at most P - s micro-batches' activations are alive.
A step's point-to-point transfers go out as one batch_isend_irecv (NCCL runs them as one group, so two
neighbours sending to each other at once cannot wait on each other's receive).

Shapes: S positions on this rank (S/TP under sequence parallelism), B micro-batch, D hidden.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from megamoe.parallel.groups import ParallelGroups

Forward = Callable[[int, Tensor | None], Tensor]
"""forward(micro-batch index, input hidden states or None on the first stage) -> the stage's output: the
hidden states [S, B, D], or on the last stage the scalar loss to differentiate."""
Backward = Callable[[Tensor, Tensor | None], None]
"""backward(output, gradient of the output or None on the last stage): one engine backward."""
Step = Callable[[], None]
"""step(): engine.step() after a micro-batch's backward (the optimizer step at the accumulation boundary)."""


def exchange(groups: ParallelGroups, send_next: Tensor | None = None, send_prev: Tensor | None = None,
             recv_prev: torch.Size | None = None, recv_next: torch.Size | None = None,
             dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> tuple[Tensor | None, ...]:
    """Every send and receive this step needs, in one batch: (from previous stage, from next stage)."""
    ops, received = [], {}
    for tensor, peer in ((send_next, groups.pp_next), (send_prev, groups.pp_prev)):
        if tensor is not None:
            ops.append(dist.P2POp(dist.isend, tensor.detach().contiguous(), peer))
    for key, shape, peer in (("prev", recv_prev, groups.pp_prev), ("next", recv_next, groups.pp_next)):
        if shape is not None:
            received[key] = torch.empty(shape, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, received[key], peer))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return received.get("prev"), received.get("next")


def train_1f1b(groups: ParallelGroups, num_micro_batches: int, forward: Forward, backward: Backward, step: Step,
               shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
    """Run every micro-batch's forward and backward in 1F1B order (backwards in forward order). A stage steps
    only after sending its input gradient: the optimizer step's gradient norm is a collective over all stages,
    which the previous stage joins once it has that gradient."""
    first, last = groups.first_stage, groups.last_stage
    io = {"dtype": dtype, "device": device}
    in_shape, out_shape = (None if first else shape), (None if last else shape)
    warmup = min(groups.pp_size - groups.pp_rank - 1, num_micro_batches)
    alive: deque[tuple[Tensor | None, Tensor]] = deque()

    def run_forward(index: int, x: Tensor | None) -> Tensor:
        if x is not None:
            x.requires_grad_()
        y = forward(index, x)
        alive.append((x, y))
        return y

    def run_backward(dy: Tensor | None) -> Tensor | None:
        x, y = alive.popleft()
        backward(y, dy)
        return None if x is None else x.grad

    for index in range(warmup):
        x, _ = exchange(groups, recv_prev=in_shape, **io)
        exchange(groups, send_next=None if last else run_forward(index, x))
    x = exchange(groups, recv_prev=in_shape, **io)[0] if warmup < num_micro_batches else None
    for index in range(warmup, num_micro_batches):
        y = run_forward(index, x)
        _, dy = exchange(groups, send_next=None if last else y, recv_next=out_shape, **io)
        dx = run_backward(dy)
        more = index + 1 < num_micro_batches
        x, _ = exchange(groups, send_prev=dx, recv_prev=in_shape if more else None, **io)
        step()
    for _ in range(warmup):
        _, dy = exchange(groups, recv_next=out_shape, **io)
        exchange(groups, send_prev=run_backward(dy))
        step()


@torch.no_grad()
def forward_only(groups: ParallelGroups, num_micro_batches: int, forward: Forward, shape: torch.Size,
                 dtype: torch.dtype, device: torch.device) -> None:
    """Every micro-batch through the stages without gradients (evaluation)."""
    io = {"dtype": dtype, "device": device}
    for index in range(num_micro_batches):
        x, _ = exchange(groups, recv_prev=None if groups.first_stage else shape, **io)
        y = forward(index, x)
        exchange(groups, send_next=None if groups.last_stage else y)


def from_last_stage(value: Tensor, groups: ParallelGroups) -> Tensor:
    """The last stage's `value` on every stage of the pipeline (the others pass zeros of its shape)."""
    if groups.pp_group is None:
        return value
    value = value.detach().clone() if groups.last_stage else torch.zeros_like(value)
    dist.all_reduce(value, group=groups.pp_group)
    return value
