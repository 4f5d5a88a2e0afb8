"""megamoe's MoE layers for inference in plain PyTorch: top-k (with shared experts, router and expert biases),
DA-MoE, PEER, CartesianMoE and MPOE.

An independent implementation on purpose (a loop over experts, dense gathers, no dispatcher): megamoe's export
test checks these logits against the training code's. Module and parameter names mirror megamoe's MoE layer
(`<layer>.mlp.X` here is `decoder.layers.<layer>.mlp.moe.X` there), so conversion is a prefix change.

Shapes: B sequences, S positions, T = B*S tokens (t = b*S + s), D hidden, E experts, K experts per token,
F expert width, H retrieval heads, N PEER experts, n = sqrt(N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Tokens:
    """What a MoE layer knows about the tokens besides their hidden states."""

    valid_T: Tensor
    """bool, False for padding (no experts, no statistics)."""
    num_sequences: int
    importance_T: Tensor | None = None
    """DA-MoE attention_received: this block's normalised attention importance per token."""


def ffn(x_RD: Tensor, fc1: Tensor, fc2: Tensor) -> Tensor:
    """megatron's SwiGLU MLP: fc1 [2F, D] (gate rows, then up rows), fc2 [D, F], no biases."""
    gate, up = (x_RD @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


class RoutedExperts(nn.Module):
    """E SwiGLU experts stacked as linear_fc1 [E, 2F, D] and linear_fc2 [E, D, F]."""

    def __init__(self, num_experts: int, hidden_size: int, width: int) -> None:
        super().__init__()
        self.linear_fc1 = nn.Parameter(torch.empty(num_experts, 2 * width, hidden_size))
        self.linear_fc2 = nn.Parameter(torch.empty(num_experts, hidden_size, width))

    def weights(self) -> tuple[Tensor, Tensor]:
        return self.linear_fc1, self.linear_fc2

    def forward(self, x_TD: Tensor, expert_TK: Tensor, weight_TK: Tensor, keep_TK: Tensor) -> Tensor:
        """sum over a token's kept slots k of weight[t, k] * FFN_{expert[t, k]}(x_t)."""
        fc1_E, fc2_E = self.weights()
        out_TD = torch.zeros_like(x_TD)
        for e in range(fc1_E.shape[0]):
            rows, slots = ((expert_TK == e) & keep_TK).nonzero(as_tuple=True)
            if rows.numel():
                y_RD = ffn(x_TD[rows], fc1_E[e], fc2_E[e])
                out_TD.index_add_(0, rows, (weight_TK[rows, slots, None] * y_RD).to(x_TD.dtype))
        return out_TD


class MPOExperts(RoutedExperts):
    """Expert matrices as MPOs (arXiv:2203.01104): `<m>_aux<k>` [E, d, i, j, d'] per expert, the central tensor
    of each matrix m shared by all experts (on the layer, `mpo.<m>.central`); rebuilt on every forward."""

    def __init__(self, num_experts: int, tensor_shapes: dict[str, list[list[int]]], centrals: nn.ModuleDict) -> None:
        nn.Module.__init__(self)
        self.tensor_shapes = tensor_shapes
        self._centrals = [centrals]  # a list: the layer owns the central tensors, not the experts
        for name, shapes in tensor_shapes.items():
            for k, shape in enumerate(shapes):
                if k != (len(shapes) - 1) // 2:
                    self.register_parameter(f"{name}_aux{k + 1}", nn.Parameter(torch.empty(num_experts, *shape)))

    def matrix(self, name: str) -> Tensor:
        """W_m [E, I, J]: the chain T_1 ... T_n contracted over its bonds, out modes before in modes."""
        shapes = self.tensor_shapes[name]
        center = (len(shapes) - 1) // 2
        parts = [self._centrals[0][name].central if k == center else getattr(self, f"{name}_aux{k + 1}")
                 for k in range(len(shapes))]
        num_experts = parts[0].shape[0]
        acc = parts[0].expand(num_experts, *shapes[0])[:, 0]  # [E, i_1, j_1, d_1] (d_0 = 1)
        for t, shape in zip(parts[1:], shapes[1:], strict=True):
            acc = torch.einsum("e...a,eaijb->e...ijb", acc, t.expand(num_experts, *shape))
        acc = acc[..., 0]  # d_n = 1: [E, i_1, j_1, ..., i_n, j_n]
        n = len(shapes)
        acc = acc.permute(0, *(1 + 2 * k for k in range(n)), *(2 + 2 * k for k in range(n)))
        return acc.reshape(num_experts, math.prod(s[1] for s in shapes), math.prod(s[2] for s in shapes))

    def weights(self) -> tuple[Tensor, Tensor]:
        return torch.cat([self.matrix("gate"), self.matrix("up")], dim=1), self.matrix("down")


class SharedExperts(nn.Module):
    """The always-on expert, joined by 'add', 'gate' (sigmoid(x w) scaling) or 'residual' (softmax(Linear(d, 2))
    mix of the routed and shared outputs)."""

    def __init__(self, hidden_size: int, width: int, combine: str) -> None:
        super().__init__()
        self.combine = combine
        self.linear_fc1 = nn.Parameter(torch.empty(2 * width, hidden_size))
        self.linear_fc2 = nn.Parameter(torch.empty(hidden_size, width))
        if combine == "gate":
            self.gate_weight = nn.Parameter(torch.empty(1, hidden_size))
        elif combine == "residual":
            self.coefficient = nn.Linear(hidden_size, 2)

    def forward(self, x_TD: Tensor, routed_TD: Tensor) -> Tensor:
        shared_TD = ffn(x_TD, self.linear_fc1, self.linear_fc2)
        if self.combine == "add":
            return routed_TD + shared_TD
        if self.combine == "gate":
            return routed_TD + torch.sigmoid(x_TD @ self.gate_weight.t()) * shared_TD
        coef_T2 = self.coefficient(x_TD).softmax(dim=-1)
        return coef_T2[:, :1] * routed_TD + coef_T2[:, 1:] * shared_TD


def shared_experts(moe: dict, hidden_size: int) -> SharedExperts | None:
    width = moe.get("shared_expert_intermediate_size")
    return SharedExperts(hidden_size, width, moe["shared_expert_combine"]) if width else None


def top_experts(logits_TE: Tensor, k: int, pre_softmax: bool, bias_E: Tensor | None, skip: int):
    """(experts [T, K], weights [T, K]): the k best by probability (+ selection-only bias) after skipping the
    `skip` best; weights are the full softmax's probabilities (pre_softmax) or a softmax over the chosen logits."""
    probs_TE = logits_TE.softmax(dim=-1)
    scores_TE = probs_TE if pre_softmax else logits_TE
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    expert_TK = choice_TE.topk(k + skip, dim=-1).indices[:, skip:]
    chosen_TK = scores_TE.gather(1, expert_TK)
    return expert_TK, chosen_TK if pre_softmax else chosen_TK.softmax(dim=-1)


class TopKMoE(nn.Module):
    """Token-choice top-k over routed experts (an fp32 router), plus an optional shared expert."""

    def __init__(self, moe: dict, hidden_size: int, drop_top_ranks: int | None = None) -> None:
        super().__init__()
        self.moe, num_experts = moe, moe["num_experts"]
        self.skip = moe.get("drop_top_ranks", 0) if drop_top_ranks is None else drop_top_ranks
        self.router = nn.Linear(hidden_size, num_experts, bias=moe.get("router_bias", False))
        if moe.get("router_enable_expert_bias", False):
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.experts = self.build_experts(hidden_size)
        self.shared_experts = shared_experts(moe, hidden_size)

    def build_experts(self, hidden_size: int) -> RoutedExperts:
        return RoutedExperts(self.moe["num_experts"], hidden_size, self.moe["ffn_hidden_size"])

    def forward(self, x_TD: Tensor, tokens: Tokens) -> Tensor:
        logits_TE = F.linear(x_TD.float(), *(p.float() for p in self.router.parameters()))  # fp32 router
        expert_TK, weight_TK = top_experts(logits_TE, self.moe["router_topk"], self.moe["router_pre_softmax"],
                                           getattr(self, "expert_bias", None), self.skip)
        if self.moe.get("router_gate") == "unit_st":  # the straight-through gate's value is 1
            weight_TK = torch.ones_like(weight_TK)
        keep_TK = tokens.valid_T[:, None].expand_as(expert_TK)
        out_TD = self.experts(x_TD, expert_TK, weight_TK, keep_TK)
        return out_TD if self.shared_experts is None else self.shared_experts(x_TD, out_TD)


class CentralTensor(nn.Module):
    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.central = nn.Parameter(torch.empty(*shape))


class MPOEMoE(TopKMoE):
    """Top-k (Switch top-1 by default) over MPO experts sharing each matrix's central tensor."""

    def build_experts(self, hidden_size: int) -> MPOExperts:
        shapes = self.moe["mpo_tensor_shapes"]
        self.mpo = nn.ModuleDict({name: CentralTensor(s[(len(s) - 1) // 2]) for name, s in shapes.items()})
        return MPOExperts(self.moe["num_experts"], shapes, self.mpo)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class CartesianMoE(nn.Module):
    """arXiv:2410.16077: yA = moe_a(norm_a(h)); yB = moe_b(norm_b(h + yA)); the block adds yA + yB to h (its
    pre-MLP norm is the identity)."""

    def __init__(self, moe: dict, hidden_size: int, eps: float) -> None:
        super().__init__()
        scope, skip = moe.get("drop_top_scope", "both"), moe.get("drop_top_ranks", 0)
        self.norm_a = RMSNorm(hidden_size, eps)
        self.moe_a = TopKMoE(moe, hidden_size, skip if scope in ("a", "both") else 0)
        self.norm_b = RMSNorm(hidden_size, eps)
        self.moe_b = TopKMoE(moe, hidden_size, skip if scope in ("b", "both") else 0)

    def forward(self, h_TD: Tensor, tokens: Tokens) -> Tensor:
        y_a = self.moe_a(self.norm_a(h_TD), tokens)
        return y_a + self.moe_b(self.norm_b(h_TD + y_a), tokens)


def experts_per_token(s_T: Tensor, valid_T: Tensor, moe: dict, scale: Tensor | None) -> Tensor:
    """DA-MoE's K per token (arXiv:2409.06669): clamp(ceil(s K_max), K_min, K_max); with a budget, K from the
    mean-K target ('batch': exactly over this forward's tokens; 'running': the trained scale c). 0 for pads."""
    k_min, k_max, s_T = moe["k_min"], moe["k_max"], s_T.double()
    if moe["budget"] == "running":
        k_T = torch.round(float(scale) * s_T).clamp(k_min, k_max).long()
    elif moe["budget"] == "batch":
        k_T = budget_experts(s_T, valid_T, k_min, k_max, moe["budget_k_mean"])
    else:
        k_T = torch.ceil(s_T * k_max - 1e-6).clamp(k_min, k_max).long()  # exact multiples must not round up
    return k_T * valid_T


def budget_experts(s_T: Tensor, valid_T: Tensor, k_min: int, k_max: int, k_mean: float) -> Tensor:
    """round(k_mean x valid tokens) experts in all: kappa = clamp(c s) with c found by bisection, K = floor(kappa),
    the spare experts to the largest remainders (ties: the earlier sequence, then the earlier position)."""
    s_V, count = s_T[valid_T], int(valid_T.sum())
    budget = min(max(round(k_mean * count), k_min * count), k_max * count)
    low, high = 0.0, (k_max / max(float(s_V[s_V > 0].min()), 1e-12)) if (s_V > 0).any() else 1.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if float(torch.clamp(mid * s_V, k_min, k_max).sum()) < budget else (low, mid)
    kappa_T = torch.clamp(high * s_T, k_min, k_max) * valid_T
    k_T = kappa_T.floor().long()
    eligible_T = valid_T & (k_T < k_max)
    order_T = (-(kappa_T - k_T).masked_fill(~eligible_T, -1.0)).argsort(stable=True)  # t = b*S + s: ties in order
    chosen = order_T[:max(budget - int(k_T.sum()), 0)]
    k_T[chosen] += eligible_T[chosen].long()
    return k_T


class DynamicMoE(nn.Module):
    """DA-MoE: each token's K most probable experts, K from its importance: this block's attention received
    ('attention_received', bidirectional models) or a head on the token's own hidden state ('predicted')."""

    def __init__(self, moe: dict, hidden_size: int) -> None:
        super().__init__()
        self.moe = moe
        self.router = nn.Linear(hidden_size, moe["num_experts"], bias=False)
        if moe["importance_mode"] == "predicted":
            self.importance_head = nn.Linear(hidden_size, 1)
        if moe["budget"] == "running":
            self.register_buffer("budget_scale", torch.tensor(2.0 * moe["budget_k_mean"]))
        self.experts = RoutedExperts(moe["num_experts"], hidden_size, moe["ffn_hidden_size"])
        self.shared_experts = shared_experts(moe, hidden_size)

    def forward(self, x_TD: Tensor, tokens: Tokens) -> Tensor:
        moe, valid_T = self.moe, tokens.valid_T
        if moe["importance_mode"] == "predicted":
            head = self.importance_head
            s_T = torch.sigmoid(F.linear(x_TD.float(), head.weight.float(), head.bias.float())).squeeze(-1)
        else:
            s_T = tokens.importance_T
        k_T = experts_per_token(s_T, valid_T, moe, getattr(self, "budget_scale", None))
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        top_TK = logits_TE.topk(moe["k_max"], dim=-1)
        keep_TK = torch.arange(moe["k_max"], device=x_TD.device)[None, :] < k_T[:, None]
        raw_TK = logits_TE.softmax(dim=-1).gather(1, top_TK.indices)
        renormalised_TK = top_TK.values.masked_fill(~keep_TK, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        rule = moe["renormalize"]
        renorm_T = (k_T > 1) if rule == "k>1" else torch.full_like(k_T, rule == "always", dtype=torch.bool)
        weight_TK = torch.where(renorm_T[:, None], renormalised_TK, raw_TK)
        out_TD = self.experts(x_TD, top_TK.indices, weight_TK, keep_TK)
        return out_TD if self.shared_experts is None else self.shared_experts(x_TD, out_TD)


def attention_importance(probs_BHSS: Tensor, allowed_BSS: Tensor, mode: str, temperature: float) -> Tensor:
    """DA-MoE importance [T]: the head-averaged attention each key receives from the queries allowed to see it,
    divided by their number, normalised per sequence to [0, 1] ('max', 'minmax', 'rank' or 'softmax'); 0 for pads."""
    allowed = allowed_BSS.float()
    query_valid_BS = (allowed.sum(dim=2) > 0).float()
    received_BS = torch.einsum("bhij,bij,bi->bj", probs_BHSS.float(), allowed, query_valid_BS)
    queries_BS = torch.einsum("bij,bi->bj", allowed, query_valid_BS)
    valid_BS = queries_BS > 0
    score_BS = received_BS / probs_BHSS.shape[1] / queries_BS.clamp(min=1.0)
    top_B1 = score_BS.masked_fill(~valid_BS, torch.finfo(score_BS.dtype).min).max(dim=1, keepdim=True).values
    if mode == "max":
        out_BS = score_BS / top_B1.clamp(min=1e-12)
    elif mode == "minmax":
        bottom_B1 = score_BS.masked_fill(~valid_BS, float("inf")).min(dim=1, keepdim=True).values
        out_BS = (score_BS - bottom_B1) / (top_B1 - bottom_B1).clamp(min=1e-12)
    elif mode == "rank":
        masked_BS = score_BS.masked_fill(~valid_BS, torch.finfo(score_BS.dtype).min)
        rank_BS = masked_BS.argsort(dim=1).argsort(dim=1).float() - (~valid_BS).sum(dim=1, keepdim=True)
        out_BS = rank_BS / (valid_BS.sum(dim=1, keepdim=True) - 1).clamp(min=1)
    else:
        out_BS = torch.exp((score_BS - top_B1) / temperature)
    return out_BS.clamp(0.0, 1.0).masked_fill(~valid_BS, 0.0).reshape(-1)


class QueryBatchNorm(nn.Module):
    """PEER's query BatchNorm: running statistics in evaluation; in training, statistics of the valid rows."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, q_TF: Tensor, valid_T: Tensor) -> Tensor:
        if not self.training:
            return (q_TF - self.running_mean) * torch.rsqrt(self.running_var + self.eps) * self.weight + self.bias
        rows = q_TF[valid_T]
        mean, var = rows.mean(dim=0), rows.var(dim=0, unbiased=False)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * rows.shape[0] / max(rows.shape[0] - 1, 1), self.momentum)
        return (q_TF - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class PEERTables(nn.Module):
    """E_down and E_up [N, D]; expert i is row placement[i]."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.up = nn.Parameter(torch.empty(num_experts, hidden_size))


class PEERMoE(nn.Module):
    """PEER (arXiv:2407.04153): each of H heads retrieves its k best of N single-neuron experts by product keys;
    y = sum over heads and retrieved experts of g * gelu(u . x) v, g the softmax (or sigmoid) of the scores."""

    CHUNK_TOKENS = 256  # bounds the gathered [tokens, H*k, D] rows

    def __init__(self, moe: dict, hidden_size: int) -> None:
        super().__init__()
        self.moe = moe
        heads, key_dim, n = moe["num_heads"], moe["key_dim"], math.isqrt(moe["num_experts"])
        key_shape = (n, key_dim // 2) if moe["shared_keys"] else (heads, n, key_dim // 2)
        self.keys1, self.keys2 = nn.Parameter(torch.empty(*key_shape)), nn.Parameter(torch.empty(*key_shape))
        self.query = nn.Linear(hidden_size, heads * key_dim, bias=False)
        norm = moe["query_norm"]
        self.query_norm = QueryBatchNorm(heads * key_dim) if norm == "batchnorm" else \
            nn.LayerNorm(heads * key_dim) if norm == "layernorm" else None
        self.register_buffer("placement", torch.arange(moe["num_experts"]))
        self.experts = PEERTables(moe["num_experts"], hidden_size)

    def retrieve(self, x_TD: Tensor, valid_T: Tensor) -> tuple[Tensor, Tensor]:
        """(gates [T, H, k], expert ids [T, H, k]) by the exact product-key search: the best pairs (a, b) of the
        two sub-key halves lie among the k x k pairs of each half's k best."""
        moe, k = self.moe, self.moe["topk_per_head"]
        q_TF = F.linear(x_TD.float(), self.query.weight.float())
        if isinstance(self.query_norm, QueryBatchNorm):
            q_TF = self.query_norm(q_TF, valid_T)
        elif self.query_norm is not None:
            q_TF = self.query_norm(q_TF)
        q1_THC, q2_THC = q_TF.view(x_TD.shape[0], moe["num_heads"], moe["key_dim"]).chunk(2, dim=-1)
        pattern = "thc,nc->thn" if self.keys1.dim() == 2 else "thc,hnc->thn"
        best1, best2 = (torch.einsum(pattern, q, keys.float()).topk(k, dim=-1)
                        for q, keys in ((q1_THC, self.keys1), (q2_THC, self.keys2)))
        n = self.keys1.shape[-2]
        pair_scores = (best1.values[..., :, None] + best2.values[..., None, :]).flatten(-2)
        pair_ids = (best1.indices[..., :, None] * n + best2.indices[..., None, :]).flatten(-2)
        scores_THK, position = pair_scores.topk(k, dim=-1)
        gates_THK = scores_THK.softmax(dim=-1) if moe["gate"] == "softmax" else torch.sigmoid(scores_THK)
        return gates_THK * valid_T[:, None, None], pair_ids.gather(-1, position)

    def forward(self, x_TD: Tensor, tokens: Tokens) -> Tensor:
        gates_TM, ids_TM = (v.flatten(1) for v in self.retrieve(x_TD, tokens.valid_T))
        rows_TM = self.placement[ids_TM]
        dt = torch.promote_types(x_TD.dtype, torch.float32)
        out = []
        for lo in range(0, x_TD.shape[0], self.CHUNK_TOKENS):
            x_CD, rows_CM = x_TD[lo:lo + self.CHUNK_TOKENS].to(dt), rows_TM[lo:lo + self.CHUNK_TOKENS]
            pre_CM = torch.einsum("cmd,cd->cm", self.experts.down[rows_CM].to(dt), x_CD)
            act_CM = gates_TM[lo:lo + self.CHUNK_TOKENS].to(dt) * F.gelu(pre_CM)
            out.append(torch.einsum("cm,cmd->cd", act_CM, self.experts.up[rows_CM].to(dt)))
        return torch.cat(out).to(x_TD.dtype) if out else torch.zeros_like(x_TD)


def build_moe(moe: dict, hidden_size: int, eps: float) -> nn.Module:
    """The MoE layer of variant moe['variant']."""
    variant = moe["variant"]
    if variant == "topk":
        return TopKMoE(moe, hidden_size)
    if variant == "mpo":
        return MPOEMoE(moe, hidden_size)
    if variant == "cartesian":
        return CartesianMoE(moe, hidden_size, eps)
    if variant == "dynamic":
        return DynamicMoE(moe, hidden_size)
    if variant == "peer":
        return PEERMoE(moe, hidden_size)
    raise ValueError(f"moe variant {variant!r} is unknown to this megamoe export")
