"""Token dispatchers: bring every routed copy to the rank owning its expert, and its result back.

Stateless (not modules, nothing kept between calls: safe under recompute and pipeline micro-batches);
per-call data rides in a frozen DispatchMeta. `dispatch` returns the rows of this rank's experts grouped
expert by expert; `combine` weights each copy's result and sums the copies of every token.

Shapes: T tokens on this rank, D hidden, N routed copies made here, R rows for this rank's experts,
P expert-parallel ranks, e local experts (E = P * e).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megamoe.moe import host
from megamoe.moe.routing import Routing
from megamoe.parallel.comm import all_to_all, exchange_counts
from megamoe.parallel.experts import ExpertPlacement


@dataclass(frozen=True)
class DispatchMeta:
    order_N: Tensor
    """Permutation of the copies grouping them by expert (token order kept inside an expert)."""
    send_splits: list[int]
    """Rows sent to each expert-parallel rank."""
    recv_splits: list[int]
    """Rows received from each expert-parallel rank."""
    regroup_R: Tensor | None
    """Received rows (grouped by source rank, then expert) -> grouped by expert, then source rank."""
    inverse_R: Tensor | None
    """The inverse permutation of regroup_R (expert-major rows back to rank-major, for the return trip)."""
    slot_N: Tensor | None
    """Capacity padding: the padded row holding each (sorted) copy; None without padding."""


def _sorted_rows(x_TD: Tensor, routing: Routing, pad_to: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The copies' rows grouped by expert (padded to `pad_to` rows per expert if given): (order, rows,
    rows per expert, padded slot of each copy or None)."""
    order_N = routing.expert_N.argsort(stable=True)
    # index_select, not x[index]: its backward is an index_add (advanced indexing's is a slower index_put).
    x_ND, counts_E, slot_N = x_TD.index_select(0, routing.token_N[order_N]), routing.tokens_per_expert(), None
    if pad_to is not None:
        x_ND, slot_N = _pad_to_capacity(x_ND, routing.expert_N[order_N], counts_E, pad_to)
        counts_E = torch.full_like(counts_E, pad_to)
    return order_N, x_ND, counts_E, slot_N


def _pad_to_capacity(x_ND: Tensor, expert_N: Tensor, counts_E: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Rows of expert e go to slots [e*C, e*C + count_e); the other slots stay zero (their results are dropped)."""
    group_start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert = torch.arange(expert_N.numel(), device=expert_N.device) - group_start_E[expert_N]
    slot_N = expert_N * capacity + rank_in_expert
    padded = x_ND.new_zeros((counts_E.numel() * capacity, x_ND.shape[1])).index_copy(0, slot_N, x_ND)
    return padded, slot_N


def _weighted_sum(y_ND: Tensor, routing: Routing, order_N: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[t] = sum over t's copies of weight * y, in fp32 (a token with no copy gets exactly 0)."""
    weighted_ND = y_ND.float() * routing.weight_N[order_N, None].float()
    out_TD = weighted_ND.new_zeros((routing.num_tokens, y_ND.shape[1]))
    return out_TD.index_add(0, routing.token_N[order_N], weighted_ND).to(out_dtype)


class LocalDispatcher:
    """All experts on this rank (EP = 1): sort the copies by expert, and back.

    `pad_to` (per call): give every expert exactly this many rows (capacity padding); None: as routed.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TD: Tensor, routing: Routing,
                 pad_to: int | None = None) -> tuple[Tensor, Tensor, DispatchMeta]:
        order_N, x_ND, counts_E, slot_N = _sorted_rows(x_TD, routing, pad_to)
        meta = DispatchMeta(order_N=order_N, send_splits=[], recv_splits=[], regroup_R=None, inverse_R=None,
                            slot_N=slot_N)
        return x_ND, counts_E, meta

    def combine(self, y_RD: Tensor, routing: Routing, meta: DispatchMeta) -> Tensor:
        y_ND = y_RD if meta.slot_N is None else y_RD.index_select(0, meta.slot_N)
        return _weighted_sum(y_ND, routing, meta.order_N, y_RD.dtype)


def _rank_major_to_expert_major(counts_Pe: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """The index that reorders rows received as [(src0, e0), (src0, e1), (src1, e0), ...] expert-major, and its
    inverse; built on the host from the split sizes the host already holds, then copied (no device value read)."""
    rows = sum(map(sum, counts_Pe))
    counts = torch.tensor(counts_Pe, dtype=torch.int64)
    start_Pe = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).view_as(counts)
    length_eP, start_eP = counts.t().flatten(), start_Pe.t().flatten()
    first_R = torch.repeat_interleave(start_eP, length_eP, output_size=rows)
    offset_R = torch.arange(rows) - torch.repeat_interleave(torch.cumsum(length_eP, 0) - length_eP, length_eP,
                                                            output_size=rows)
    regroup_R = first_R + offset_R
    inverse_R = torch.empty_like(regroup_R).index_copy_(0, regroup_R, torch.arange(rows))
    return regroup_R.to(device), inverse_R.to(device)


class AllToAllDispatcher:
    """Experts sharded over an expert-parallel group: count exchange, one host sync, uneven all-to-all.

    With capacity padding (`pad_to`, equal on every rank) every expert takes exactly that many rows from
    every rank, so the splits are known in advance: no count exchange and no host sync.
    """

    def __init__(self, placement: ExpertPlacement) -> None:
        self.num_experts, self.group = placement.num_experts, placement.groups.ep_group
        self.num_local = placement.num_local
        # Each expert-parallel rank's experts, as slices over [E] counts.
        self.rank_experts = [placement.experts_of(p) for p in range(placement.groups.ep_size)]

    def dispatch(self, x_TD: Tensor, routing: Routing,
                 pad_to: int | None = None) -> tuple[Tensor, list[int], DispatchMeta]:
        """(this rank's rows grouped by expert, rows per local expert as host ints, meta)."""
        order_N, x_ND, counts_E, slot_N = _sorted_rows(x_TD, routing, pad_to)
        if pad_to is not None:
            send_Pe = [[pad_to] * self.num_local for _ in self.rank_experts]
            recv_Pe = send_Pe
        else:
            recv_E = exchange_counts(counts_E, self.group)
            # all_to_all_single takes split sizes as Python ints: the one host read of a dispatch.
            send_E, recv_E = host.read_on_host(torch.stack([counts_E, recv_E]), "split sizes of the all-to-all")
            send_Pe = [send_E[experts] for experts in self.rank_experts]
            recv_Pe = [recv_E[experts] for experts in self.rank_experts]
        send_splits, recv_splits = [sum(c) for c in send_Pe], [sum(c) for c in recv_Pe]
        x_recv_RD = all_to_all(x_ND, recv_splits, send_splits, self.group)
        regroup_R, inverse_R = _rank_major_to_expert_major(recv_Pe, x_TD.device)
        counts_e = [sum(col) for col in zip(*recv_Pe, strict=True)]  # known on the host: no second read
        meta = DispatchMeta(order_N=order_N, send_splits=send_splits, recv_splits=recv_splits, regroup_R=regroup_R,
                            inverse_R=inverse_R, slot_N=slot_N)
        # index_select, not x[index]: its backward is an index_add (advanced indexing's is a slower index_put).
        return x_recv_RD.index_select(0, regroup_R), counts_e, meta

    def combine(self, y_RD: Tensor, routing: Routing, meta: DispatchMeta) -> Tensor:
        y_back = all_to_all(y_RD.index_select(0, meta.inverse_R), meta.send_splits, meta.recv_splits, self.group)
        y_ND = y_back if meta.slot_N is None else y_back.index_select(0, meta.slot_N)
        return _weighted_sum(y_ND, routing, meta.order_N, y_RD.dtype)
