"""DA-MoE token importance and experts per token (docs/variants.md §3.2-3.3), in plain PyTorch.

Importance of key token j: the head-averaged attention it receives from the valid queries allowed to see
it, divided by how many such queries there are, normalised per sequence to [0, 1]; never differentiated.
K_j = clamp(ceil(s_j K_max - 1e-6), K_min, K_max), or matched to a mean-K budget.

Shapes: B sequences, H attention heads, S positions (queries i, keys j), T = S*B tokens in megatron's
order t = s*B + b.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megamoe.moe.host import where_true
from megamoe.moe.layer import Importance


def column_sums(probs_BHSS: Tensor, mask_BSS: Tensor | None, query_weight: str = "count") -> tuple[Tensor, Tensor]:
    """Attention received per key, summed over the given heads, and the number of queries seeing each key.

    probs: softmax output before dropout. mask: True = not allowed (megatron's convention), broadcast over
    heads; None = every query sees every key. A query whose row is fully masked is padding: it counts for
    nothing. query_weight 'uniform_relative' weights each query by how many keys it sees, so uniform causal
    attention gives every key the same received/queries (docs/variants.md §3.2 (b)).
    Returns (received_BS summed over heads, queries_BS).
    """
    probs_BHSS = probs_BHSS.float()
    batch, _, seq, _ = probs_BHSS.shape
    if mask_BSS is None:
        allowed_BSS = torch.ones(1, seq, seq, dtype=torch.bool, device=probs_BHSS.device)
    else:
        allowed_BSS = ~mask_BSS.reshape(-1, seq, seq)
    allowed_BSS = allowed_BSS.expand(batch, seq, seq).float()
    keys_per_query_BS = allowed_BSS.sum(dim=2)
    query_valid_BS = (keys_per_query_BS > 0).float()
    weight_BS = query_valid_BS * (keys_per_query_BS if query_weight == "uniform_relative" else 1.0)
    received_BS = torch.einsum("bhij,bij,bi->bj", probs_BHSS, allowed_BSS, weight_BS)
    queries_BS = torch.einsum("bij,bi->bj", allowed_BSS, query_valid_BS)
    return received_BS, queries_BS


def normalize_importance(score_BS: Tensor, valid_BS: Tensor, mode: str = "max", temperature: float = 1.0) -> Tensor:
    """Per sequence, map the valid tokens' scores to [0, 1] ('max': divide by the largest; 'minmax'; 'rank';
    'softmax': softmax(score / temperature) scaled so the largest is 1). Padding gets 0."""
    neg_inf = torch.finfo(score_BS.dtype).min
    masked_BS = score_BS.masked_fill(~valid_BS, neg_inf)
    top_B1 = masked_BS.max(dim=1, keepdim=True).values
    if mode == "max":
        out_BS = score_BS / top_B1.clamp(min=1e-12)
    elif mode == "minmax":
        bottom_B1 = score_BS.masked_fill(~valid_BS, float("inf")).min(dim=1, keepdim=True).values
        out_BS = (score_BS - bottom_B1) / (top_B1 - bottom_B1).clamp(min=1e-12)
    elif mode == "rank":
        rank_BS = masked_BS.argsort(dim=1).argsort(dim=1).float() - (~valid_BS).sum(dim=1, keepdim=True)
        out_BS = rank_BS / (valid_BS.sum(dim=1, keepdim=True) - 1).clamp(min=1)
    else:
        out_BS = torch.exp((score_BS - top_B1) / temperature)
    return out_BS.clamp(0.0, 1.0).masked_fill(~valid_BS, 0.0)


def importance_from_columns(received_BS: Tensor, queries_BS: Tensor, num_heads: int, mode: str = "max",
                            temperature: float = 1.0) -> Importance:
    """Head-averaged, per-query normalised and per-sequence normalised importance in token order."""
    valid_BS = queries_BS > 0
    score_BS = received_BS / num_heads / queries_BS.clamp(min=1.0)
    s_BS = normalize_importance(score_BS, valid_BS, mode, temperature)
    return Importance(score_T=s_BS.t().reshape(-1), valid_T=valid_BS.t().reshape(-1))


def experts_per_token(s_T: Tensor, valid_T: Tensor | None, k_min: int, k_max: int) -> Tensor:
    """K = clamp(ceil(s K_max - 1e-6), K_min, K_max) (the 1e-6 keeps exact multiples from rounding up); 0 for pads."""
    k_T = torch.ceil(s_T.double() * k_max - 1e-6).clamp(k_min, k_max).long()
    return k_T if valid_T is None else k_T * valid_T


def budget_scale(s_T: Tensor, valid_T: Tensor, k_min: int, k_max: int, k_mean: float) -> Tensor:
    """The c (a float64 0-d tensor) with sum over valid tokens of clamp(c s, K_min, K_max) = round(k_mean x valid
    tokens), by bisection on the device: one host read (the number of valid tokens), not one per iteration."""
    s = s_T.double().index_select(0, where_true(valid_T, "DA-MoE: the valid tokens sharing the budget"))
    budget = min(max(round(k_mean * s.numel()), k_min * s.numel()), k_max * s.numel())
    smallest = s.masked_fill(s <= 0, math.inf).min() if s.numel() else s.new_tensor(math.inf)
    low = s.new_zeros(())
    high = torch.where(smallest < math.inf, k_max / smallest.clamp(min=1e-12), s.new_ones(()))
    for _ in range(100):
        mid = (low + high) / 2
        below = torch.clamp(mid * s, k_min, k_max).sum() < budget
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    return high


def budget_experts(s_T: Tensor, valid_T: Tensor, num_sequences: int, k_min: int, k_max: int,
                   k_mean: float) -> Tensor:
    """Exactly round(k_mean x valid tokens) copies: kappa = clamp(c s), K = floor(kappa), spare units to the
    largest remainders, ties to the lower (sequence, position)."""
    c = budget_scale(s_T, valid_T, k_min, k_max, k_mean)
    kappa_T = torch.clamp(c * s_T.double(), k_min, k_max) * valid_T
    k_T = kappa_T.floor().long()
    valid = valid_T.sum()
    spare = torch.minimum(torch.maximum(torch.round(k_mean * valid.double()).long(), k_min * valid),
                          k_max * valid) - k_T.sum()
    tokens = torch.arange(s_T.numel(), device=s_T.device)
    tie_order_T = (tokens % num_sequences) * (s_T.numel() // num_sequences) + tokens // num_sequences  # (b, s)
    eligible_T = valid_T & (k_T < k_max)
    remainder_T = (kappa_T - k_T).masked_fill(~eligible_T, -1.0)
    order = tie_order_T.argsort()
    order = order[(-remainder_T[order]).argsort(stable=True)]  # largest remainder first, ties by (b, s)
    chosen_T = torch.zeros_like(eligible_T).index_copy_(0, order, tokens < spare)  # the first `spare` of the order
    return k_T + (chosen_T & eligible_T).long()


def running_experts(s_T: Tensor, valid_T: Tensor | None, scale: Tensor | float, k_min: int, k_max: int) -> Tensor:
    """K = clamp(round(c s), K_min, K_max) with a calibrated c (causal-safe budget); 0 for pads."""
    k_T = torch.round(scale * s_T.double()).clamp(k_min, k_max).long()
    return k_T if valid_T is None else k_T * valid_T
