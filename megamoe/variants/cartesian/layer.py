"""CartesianMoE (arXiv:2410.16077): Cartesian-product routing through two sequential sub-expert layers.

A token passes sub-layer A, then sub-layer B; each is a top-k MoE with its own RMSNorm, fp32 router
(renormalised for k > 1; top-1 gates with the chosen expert's probability, router_pre_softmax=true, as the
authors' code does: a renormalised top-1 weight is always 1 and is refused), half-width SwiGLU experts and a shared
expert mixed by softmax(Linear(d, 2)) with bias (DeepSpeed's Residual-MoE coefficient). The composite experts
FFN_B o FFN_A form the Cartesian product of the two sets (docs/variants.md §5.2):
    yA = moe_a(norm_a(h));  yB = moe_b(norm_b(h + yA));  the block adds yA + yB to h.
The layer spec replaces the block's pre-MLP norm by IdentityOp, so this layer receives h (exact with
hidden_dropout = 0, the LLaMA setting). Each sub-layer goes through the shared dispatcher (two sequential
all-to-alls under EP: B's input depends on A's output) and attaches its own load-balancing loss.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from megamoe.moe.layer import LayerShape, TokenInfo
from megamoe.parallel.comm import reduce_grad
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.cartesian import CartesianMoEConfig
from megamoe.variants.topk.layer import TopKMoE

SUBLAYER_SEED_STRIDE = 1_000_003  # sub-layer B's experts get their own initial weights


class RMSNorm(torch.nn.Module):
    """x / rms(x) * weight; under sequence parallelism the weight's gradient is summed over `sp_group`."""

    def __init__(self, hidden_size: int, eps: float, sp_group=None) -> None:
        super().__init__()
        self.eps, self.sp_group = eps, sp_group
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))

    def forward(self, x_TD: Tensor) -> Tensor:
        return F.rms_norm(x_TD, (x_TD.shape[-1],), reduce_grad(self.weight, self.sp_group).to(x_TD.dtype), self.eps)


class CartesianMoE(torch.nn.Module):
    """Sub-layers moe_a and moe_b with their norms; experts and routers of each are distinct modules (their
    checkpoint names stay distinct, so expert shards reshard per group)."""

    def __init__(self, cfg: CartesianMoEConfig, shape: LayerShape, groups: ParallelGroups) -> None:
        super().__init__()
        self.cfg = cfg
        scope = cfg.drop_top_scope
        sub = {name: dataclasses.replace(cfg, drop_top_ranks=cfg.drop_top_ranks if scope in (name, "both") else 0)
               for name in ("a", "b")}
        self.norm_a = RMSNorm(shape.hidden_size, shape.norm_epsilon, groups.sp_group)
        self.moe_a = TopKMoE(sub["a"], dataclasses.replace(shape, sublayer="a"), groups)
        self.norm_b = RMSNorm(shape.hidden_size, shape.norm_epsilon, groups.sp_group)
        self.moe_b = TopKMoE(sub["b"], dataclasses.replace(shape, sublayer="b",
                                                           seed=shape.seed + SUBLAYER_SEED_STRIDE), groups)

    def forward(self, h_TD: Tensor, tokens: TokenInfo | None = None) -> Tensor:
        """1. sub-layer A on norm_a(h) 2. residual 3. sub-layer B on norm_b(h + yA) 4. both outputs to the block."""
        y_a = self.moe_a(self.norm_a(h_TD), tokens)
        y_b = self.moe_b(self.norm_b(h_TD + y_a), tokens)
        return y_a + y_b
