"""PEER (arXiv:2407.04153): retrieval of h x k single-neuron experts out of N = n^2 by product keys.

y(x) = sum over heads h and retrieved experts i of g_hi * gelu(u_i . x) v_i, with g the softmax of each head's
k scores. Expert tables E_down (u) and E_up (v) [N, d] are row-sharded over the expert-parallel group like a
vocabulary-parallel embedding (docs/variants.md §4.5): expert i lives at storage row pi(i) of a fixed permutation
(from placement_seed, saved with the model), so shards do not inherit sub-key imbalance and resharding is a
re-split. The router is replicated: every rank of the group routes all of the group's tokens (gathered), sums
the experts it owns, and one reduce-scatter of the [T, d] partial outputs combines them. No all-to-all, no
capacity, no host sync.

Shapes: T tokens on this rank, G tokens of the group, D hidden, h heads, k experts per head, N experts,
n = sqrt(N), R table rows on this rank, M slots per token (its copies this rank owns, compacted), C the
tokens of a chunk.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from megamoe.moe import host
from megamoe.moe.experts import Experts
from megamoe.moe.layer import LayerShape, MoELayer, TokenInfo
from megamoe.moe.routing import Routing
from megamoe.parallel.comm import all_reduce_sum, gather_rows, gather_values, reduce_grad, reduce_scatter_rows
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.peer import PEERMoEConfig
from megamoe.variants.peer.product_keys import MaskedBatchNorm, product_key_topk

INIT_BLOCK_ROWS = 4096  # tables are initialised in blocks with their own seeds: independent of the sharding


class PEERTables(Experts):
    """Storage rows [first_expert, first_expert + num_local) of E_down and E_up (fp32 init N(0, 1/d), PKM's
    value initialisation; never nn.Embedding's N(0, 1))."""

    def __init__(self, *, num_local: int, first_row: int, hidden_size: int, seed: int, layer_number: int,
                 replica_group=None) -> None:
        super().__init__()
        self.first_expert, self.num_local, self.replica_group = first_row, num_local, replica_group
        self.down = torch.nn.Parameter(torch.empty(num_local, hidden_size))
        self.up = torch.nn.Parameter(torch.empty(num_local, hidden_size))
        std = hidden_size ** -0.5
        for which, table in enumerate((self.down, self.up)):
            _init_rows(table, first_row, std, seed + 1_000_003 * layer_number + 7 * which)

    def forward(self, x_GD: Tensor, rows_GM: Tensor, weight_GM: Tensor, mask_GM: Tensor, chunk: int) -> Tensor:
        """Slots j of token t use local row rows_GM[t, j] with weight weight_GM[t, j] (masked slots weigh 0)."""
        down, up = (reduce_grad(t, self.replica_group) for t in (self.down, self.up))
        return _SingletonExperts.apply(x_GD, rows_GM, weight_GM, mask_GM, down, up, chunk)


@torch.no_grad()
def _init_rows(table: Tensor, first_row: int, std: float, seed: int) -> None:
    last_row = first_row + table.shape[0]
    for block in range(first_row // INIT_BLOCK_ROWS, (last_row - 1) // INIT_BLOCK_ROWS + 1):
        gen = torch.Generator().manual_seed(seed * 65537 + block)
        values = torch.empty(INIT_BLOCK_ROWS, table.shape[1]).normal_(0.0, std, generator=gen)
        lo, hi = max(first_row, block * INIT_BLOCK_ROWS), min(last_row, (block + 1) * INIT_BLOCK_ROWS)
        table[lo - first_row:hi - first_row] = values[lo - block * INIT_BLOCK_ROWS:hi - block * INIT_BLOCK_ROWS]


class _SingletonExperts(torch.autograd.Function):
    """y[t] = sum over j of w[t, j] gelu(x_t . down[r[t, j]]) up[r[t, j]] for the slots j with mask[t, j].

    The [G, M] dot products of the tokens with their down rows are `_slot_dots`; the weighted sum of up rows is
    an embedding_bag (no [tokens, slots, D] product). Saved: x, rows, weights and the [G, M] pre-activations. The
    backward: the dot products of dy with the up rows, dx an embedding_bag of down rows, and the table gradients
    accumulated chunk by chunk into one [R, D] buffer per table (autograd's embedding backward would build a dense
    [R, D] gradient per chunk: 2 GB each at N = 1024^2, d = 256).
    """

    @staticmethod
    def forward(ctx, x_GD, rows_GM, weight_GM, mask_GM, down, up, chunk: int) -> Tensor:
        dt = torch.promote_types(x_GD.dtype, torch.float32)  # at least fp32 sums
        x_dt, up_dt = x_GD.to(dt), up.to(dt)
        pre_GM = _slot_dots(x_dt, down.to(dt), rows_GM, chunk)
        ctx.save_for_backward(x_GD, rows_GM, weight_GM, mask_GM, down, up, pre_GM)
        ctx.chunk = chunk
        if x_GD.shape[0] == 0:
            return torch.zeros_like(x_GD)
        y_GD = F.embedding_bag(rows_GM, up_dt, per_sample_weights=weight_GM.to(dt) * F.gelu(pre_GM), mode="sum")
        return y_GD.to(x_GD.dtype)

    @staticmethod
    def backward(ctx, grad_GD):
        x_GD, rows_GM, weight_GM, mask_GM, down, up, pre_GM = ctx.saved_tensors
        dt = torch.promote_types(x_GD.dtype, torch.float32)
        x_dt, w_GM, down_dt, up_dt, dy_GD = (t.to(dt) for t in (x_GD, weight_GM, down, up, grad_GD))
        act_GM = F.gelu(pre_GM)
        dwa_GM = _slot_dots(dy_GD.contiguous(), up_dt, rows_GM, ctx.chunk)  # d loss / d (w * act)
        grad_w = dwa_GM * act_GM * mask_GM  # padding slots belong to other ranks (or nobody)
        dpre_GM = torch.ops.aten.gelu_backward(dwa_GM * w_GM, pre_GM)
        grad_x = (F.embedding_bag(rows_GM, down_dt, per_sample_weights=dpre_GM, mode="sum") if x_GD.shape[0]
                  else torch.zeros_like(x_dt))
        grad_down, grad_up = torch.zeros_like(down_dt), torch.zeros_like(up_dt)
        for lo in range(0, x_GD.shape[0], ctx.chunk):
            part = slice(lo, lo + ctx.chunk)
            flat_rows = rows_GM[part].reshape(-1)  # [C, M, D] outer products of a chunk at a time
            grad_up.index_add_(0, flat_rows, ((w_GM[part] * act_GM[part])[:, :, None]
                                              * dy_GD[part, None, :]).flatten(0, 1))
            grad_down.index_add_(0, flat_rows, (dpre_GM[part, :, None] * x_dt[part, None, :]).flatten(0, 1))
        return (grad_x.to(x_GD.dtype), None, grad_w.to(weight_GM.dtype), None, grad_down.to(down.dtype),
                grad_up.to(up.dtype), None)


def _slot_dots(x_GD: Tensor, table_RD: Tensor, rows_GM: Tensor, chunk: int) -> Tensor:
    """[G, M]: x_t . table[rows[t, j]] for every token t and slot j."""
    if _sddmm_applies(x_GD, table_RD, rows_GM):
        return _sampled_dots(x_GD, table_RD, rows_GM)
    dots = [torch.bmm(_rows(table_RD, rows_GM[lo:lo + chunk]), x_GD[lo:lo + chunk, :, None]).squeeze(-1)
            for lo in range(0, x_GD.shape[0], chunk)]
    return torch.cat(dots) if dots else rows_GM.new_zeros(rows_GM.shape, dtype=x_GD.dtype)


def _sddmm_applies(x_GD: Tensor, table_RD: Tensor, rows_GM: Tensor) -> bool:
    """torch's CPU SDDMM takes rows in any order and repeated, but fails on a row of more slots than the
    table has rows (a tiny table at a high expert-parallel size). Elsewhere the gathers (GPUs: their own
    gather kernels; the meta device: no sparse layouts)."""
    return (x_GD.device.type == "cpu" and rows_GM.numel() > 0 and rows_GM.shape[1] <= table_RD.shape[0]
            and x_GD.dtype in (torch.float32, torch.float64))


def _sampled_dots(x_GD: Tensor, table_RD: Tensor, rows_GM: Tensor) -> Tensor:
    """The dot products as a sampled dense-dense product (x @ table^T at the pattern of `rows`): each one reads
    its table row in place instead of from a gathered [G, M, D] copy, half the time of gather + bmm at
    N = 1024^2 on a CPU."""
    tokens, slots = rows_GM.shape
    crow = torch.arange(0, tokens * slots + 1, slots, device=rows_GM.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(crow, rows_GM.reshape(-1), x_GD.new_zeros(tokens * slots),
                                          size=(tokens, table_RD.shape[0]), check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, x_GD, table_RD.t(), beta=0.0)
    return dots.values().view(tokens, slots)


def _rows(table: Tensor, rows_CM: Tensor) -> Tensor:
    """table[rows] as [C, M, D]; index_select's row copy is ~1.5x faster than advanced indexing here."""
    return table.index_select(0, rows_CM.reshape(-1)).view(*rows_CM.shape, table.shape[1])


class PEERMoE(MoELayer):
    """The PEER layer over the shared MoE interface (it overrides forward: no dispatcher)."""

    def __init__(self, cfg: PEERMoEConfig, shape: LayerShape, groups: ParallelGroups) -> None:
        super().__init__(cfg, shape, groups, nominal_k=cfg.num_heads * cfg.topk_per_head)
        n, half = math.isqrt(cfg.num_experts), cfg.key_dim // 2
        heads = 1 if cfg.shared_keys else cfg.num_heads
        bound = half ** -0.5  # PKM's sub-key initialisation U(+-1/sqrt(d_k/2))
        self.keys1 = torch.nn.Parameter(torch.empty(heads, n, half).uniform_(-bound, bound).squeeze(0))
        self.keys2 = torch.nn.Parameter(torch.empty(heads, n, half).uniform_(-bound, bound).squeeze(0))
        self.query = torch.nn.Linear(shape.hidden_size, cfg.num_heads * cfg.key_dim, bias=False)
        self.query_norm = _query_norm(cfg)
        # pi: expert id -> storage row; independent of the number of shards, saved with the model.
        placement = torch.randperm(cfg.num_experts, generator=torch.Generator().manual_seed(cfg.placement_seed))
        self.register_buffer("placement", placement)
        self._usage: Tensor | None = None  # z'_i of the current validation pass (owned rows)

    def build_experts(self) -> Experts:
        placement = self.expert_placement  # storage rows are sharded like experts (self.placement is pi)
        return PEERTables(num_local=placement.num_local, first_row=placement.first_expert,
                          hidden_size=self.shape.hidden_size, seed=self.shape.seed,
                          layer_number=self.shape.layer_number, replica_group=placement.replica_group)

    def build_dispatcher(self) -> None:
        return None

    @property
    def _token_group(self):
        """Ranks whose tokens this rank routes: the expert-parallel group (sharded tables), or the sequence-
        parallel group with replicated tables (BatchNorm then sees the whole micro-batch, as unsharded)."""
        return self.groups.ep_group if self.groups.ep_size > 1 else self.groups.sp_group

    def forward(self, x_TD: Tensor, tokens: TokenInfo | None = None) -> Tensor:
        """1. gather the group's tokens 2. route (replicated) 3. this rank's experts 4. combine partial outputs."""
        tokens = tokens or TokenInfo()
        group = self._token_group
        x_GD = gather_rows(x_TD, group)
        valid_G = None if tokens.valid_T is None else gather_values(tokens.valid_T, group)
        gates_GHK, ids_GHK = self.retrieve(x_GD, valid_G)
        own = self._own_tokens(x_TD.shape[0])
        rows_GM, weight_GM, mask_GM = self._owned_slots(gates_GHK, ids_GHK, valid_G)
        y_GD = self.experts(x_GD, rows_GM, weight_GM, mask_GM, self.cfg.chunk_tokens)
        local_valid = (tokens.valid_T.sum() if tokens.valid_T is not None
                       else torch.tensor(float(x_TD.shape[0]), device=x_TD.device))
        counted_GM = mask_GM.clone()
        if self.groups.ep_size == 1 and own != slice(None):  # every rank computed every copy: count its tokens
            counted_GM[:own.start], counted_GM[own.stop:] = False, False
        self._record_copies(rows_GM, weight_GM, counted_GM, local_valid)
        if self.groups.ep_size > 1:
            return reduce_scatter_rows(y_GD, group)  # partial sums -> this rank's tokens
        return y_GD[own]  # replicated tables: every rank computed the whole group; keep its own tokens

    def _own_tokens(self, num_local: int) -> slice:
        """This rank's tokens within the gathered group (gathered in group-rank order)."""
        group = self._token_group
        if group is None:
            return slice(None)
        rank = self.groups.ep_rank if self.groups.ep_size > 1 else self.groups.tp_rank
        return slice(rank * num_local, (rank + 1) * num_local)

    def retrieve(self, x_GD: Tensor, valid_G: Tensor | None) -> tuple[Tensor, Tensor]:
        """(gates [G, h, k], expert ids [G, h, k]) of every token; padding tokens get gates 0."""
        cfg, sp = self.cfg, self.groups.sp_group
        q_GF = F.linear(x_GD.float(), reduce_grad(self.query.weight, sp).float())
        if isinstance(self.query_norm, MaskedBatchNorm):
            norm = self.query_norm
            q_GF = norm(q_GF, valid_G, reduce_grad(norm.weight, sp), reduce_grad(norm.bias, sp))
        elif self.query_norm is not None:  # LayerNorm: every rank of the group normalises the group's tokens, but
            norm = self.query_norm  # backpropagates only its own: their gradients are summed, as the query's
            q_GF = F.layer_norm(q_GF, norm.normalized_shape, reduce_grad(norm.weight, sp), reduce_grad(norm.bias, sp),
                                norm.eps)
        q_GHD = q_GF.view(x_GD.shape[0], cfg.num_heads, cfg.key_dim)
        keys1, keys2 = reduce_grad(self.keys1, sp), reduce_grad(self.keys2, sp)
        scores_GHK, ids_GHK = product_key_topk(q_GHD, keys1.float(), keys2.float(), cfg.topk_per_head)
        gates_GHK = scores_GHK.softmax(dim=-1) if cfg.gate == "softmax" else torch.sigmoid(scores_GHK)
        if valid_G is not None:
            gates_GHK = gates_GHK * valid_G[:, None, None]
        return gates_GHK, ids_GHK

    def _owned_slots(self, gates_GHK: Tensor, ids_GHK: Tensor, valid_G: Tensor | None):
        """Each token's copies whose expert row this rank stores, compacted to the front of [G, M] slots (M = the
        largest count, h*k without expert parallelism): (local rows, gates, mask); masked slots use row 0."""
        rows_GC = self.placement[ids_GHK].flatten(1)
        gates_GC = gates_GHK.flatten(1)
        first, rows = self.experts.first_expert, self.experts.num_local
        mine_GC = (rows_GC >= first) & (rows_GC < first + rows)
        if valid_G is not None:
            mine_GC &= valid_G[:, None]
        if self.groups.ep_size > 1:  # owned copies first; keep only as many slots as the busiest token needs
            order_GC = (~mine_GC).to(torch.int8).argsort(dim=1, stable=True)
            width = (host.read_on_host(mine_GC.sum(dim=1).max(), "PEER: slots of the busiest token")
                     if mine_GC.numel() else 0)
            order_GC = order_GC[:, :width]
            rows_GC, gates_GC, mine_GC = (v.gather(1, order_GC) for v in (rows_GC, gates_GC, mine_GC))
        local_GC = torch.where(mine_GC, rows_GC - first, torch.zeros_like(rows_GC))
        return local_GC, gates_GC * mine_GC, mine_GC

    @torch.no_grad()
    def _record_copies(self, row_GM: Tensor, weight_GM: Tensor, counted_GM: Tensor, local_valid: Tensor) -> None:
        """Copies and valid tokens (mean experts per token); in evaluation also z'_i, the summed gates of every
        expert over the validation pass, for usage and unevenness (arXiv:2407.04153 §3). Only the `counted_GM`
        slots count: masked, not selected (a selection's size would be a host read)."""
        device = row_GM.device
        self._add_stat("copies", counted_GM.sum().float())
        self._add_stat("valid_tokens", local_valid.float())
        forwards = 1.0 / max(1, self.groups.tp_size if self._token_group else 1)
        self._add_stat("forwards", torch.tensor(forwards, device=device))
        if not self.training:
            if self._usage is None:
                self._usage = torch.zeros(self.num_experts, dtype=torch.float64, device=device)
            gate_GM = weight_GM.double() * counted_GM  # uncounted slots add exactly 0
            self._usage.index_add_(0, (row_GM + self.experts.first_expert).flatten(), gate_GM.flatten())

    def validation_metrics(self) -> dict[str, float]:
        """Usage (share of the N experts retrieved with a positive gate) and unevenness (KL(z || uniform) =
        log N + sum z log z of the normalised gate mass z) over the validation pass since the last call."""
        if self._usage is None:
            return {}
        z_N = all_reduce_sum(self._usage, self.groups.tp_dp_group)  # each (token, expert) counted once
        self._usage = None
        z_N = z_N / z_N.sum().clamp(min=1e-300)
        positive = z_N[z_N > 0]
        return {"usage": positive.numel() / self.num_experts,
                "unevenness": math.log(self.num_experts) + float((positive * positive.log()).sum())}

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average the BatchNorm running statistics over every rank (before evaluation and checkpoints)."""
        if isinstance(self.query_norm, MaskedBatchNorm) and self.groups.tp_dp_group is not None:
            size = torch.distributed.get_world_size(self.groups.tp_dp_group)
            for buffer in (self.query_norm.running_mean, self.query_norm.running_var):
                buffer.copy_(all_reduce_sum(buffer.clone(), self.groups.tp_dp_group) / size)

    def route(self, x_TD: Tensor, tokens: TokenInfo) -> tuple[Routing, None]:
        raise NotImplementedError("PEER routes inside forward (no dispatcher)")

    def stat_layout(self) -> list[tuple[str, int]]:
        """No per-expert load vector: N is up to millions (usage and unevenness come from validation)."""
        return [("copies", 1), ("valid_tokens", 1), ("forwards", 1)]


def _query_norm(cfg: PEERMoEConfig) -> torch.nn.Module | None:
    features = cfg.num_heads * cfg.key_dim
    if cfg.query_norm == "batchnorm":
        return MaskedBatchNorm(features)
    if cfg.query_norm == "layernorm":
        return torch.nn.LayerNorm(features)
    return None
