"""PEER's retrieval (docs/variants.md §4.2-4.3): query normalisation and exact product-key top-k.

Shapes: T tokens, h heads, n = sqrt(N) sub-keys per half, c = d_k / 2, k experts per head, F = h * d_k.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _inside_backward() -> bool:
    """True while autograd runs a backward pass, as when activation checkpointing re-runs a forward."""
    return torch._C._current_graph_task_id() != -1


class MaskedBatchNorm(torch.nn.Module):
    """BatchNorm over features whose training statistics come from the valid rows only (padding must not
    move them; XLM's PKM warns about it). Running statistics (fp32) are updated once per forward and never
    while a backward pass re-runs the forward (activation recomputation would update them twice)."""

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x_TF: Tensor, valid_T: Tensor | None = None, weight: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
        """`weight`/`bias`: the affine parameters as the caller wants them used (e.g. through reduce_grad)."""
        x_TF = x_TF.float()
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        if not self.training:
            return (x_TF - self.running_mean) * torch.rsqrt(self.running_var + self.eps) * weight + bias
        rows = x_TF if valid_T is None else x_TF[valid_T]
        mean, var = rows.mean(dim=0), rows.var(dim=0, unbiased=False)
        if not _inside_backward():
            with torch.no_grad():
                unbiased = var * rows.shape[0] / max(rows.shape[0] - 1, 1)
                self.running_mean.lerp_(mean.detach().float(), self.momentum)
                self.running_var.lerp_(unbiased.detach().float(), self.momentum)
        return (x_TF - mean) * torch.rsqrt(var + self.eps) * weight + bias


def product_key_topk(q_THD: Tensor, keys1: Tensor, keys2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of q . (K1[a] ++ K2[b]) over all N = n^2 pairs (a, b), via the top-k of each half.

    If (a, b) is in the global top-k, a is in the top-k of q1 . K1 and b in that of q2 . K2 (otherwise k better
    pairs would exist), so the k^2 candidate pairs contain the answer (arXiv:1907.05242, 2407.04153).
    keys: [n, c] shared by all heads, or [h, n, c] per head. Returns (scores [T, h, k], expert ids [T, h, k])
    with id = a * n + b.
    """
    q1, q2 = q_THD.chunk(2, dim=-1)
    n = keys1.shape[-2]
    v1, i1 = _half_scores(q1, keys1).topk(k, dim=-1)  # [T, h, k]
    v2, i2 = _half_scores(q2, keys2).topk(k, dim=-1)
    candidates = (v1[..., :, None] + v2[..., None, :]).flatten(-2)  # [T, h, k*k]
    candidate_ids = (i1[..., :, None] * n + i2[..., None, :]).flatten(-2)
    scores, position = candidates.topk(k, dim=-1)
    return scores, candidate_ids.gather(-1, position)


def _half_scores(q_THC: Tensor, keys: Tensor) -> Tensor:
    if keys.dim() == 2:  # shared by all heads
        return q_THC @ keys.t()
    return torch.einsum("thc,hnc->thn", q_THC, keys)
