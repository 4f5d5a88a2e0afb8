"""Token-choice top-k MoE: Switch top-1, GShard top-2, Mixtral top-k, fine-grained + shared experts.

The router is a Linear(d, E) (bias-free unless router_bias) evaluated in fp32 (Switch's selective precision),
replicated on every rank (under sequence parallelism its gradient is summed over the tensor-parallel group).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from megamoe.moe.layer import LayerShape, MoELayer, TokenInfo
from megamoe.moe.routing import Routing, topk_route
from megamoe.parallel.comm import all_reduce_sum, reduce_grad
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.topk import TopKMoEConfig


class TopKMoE(MoELayer):
    """Top-k routing with optional input jitter and aux-loss-free expert bias (see TopKMoEConfig)."""

    FP32_BUFFERS = ("expert_bias",)

    def __init__(self, cfg: TopKMoEConfig, shape: LayerShape, groups: ParallelGroups) -> None:
        super().__init__(cfg, shape, groups, nominal_k=cfg.router_topk)
        self.router = torch.nn.Linear(shape.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        torch.nn.init.normal_(self.router.weight, 0.0, shape.init_std)
        if cfg.router_bias:
            torch.nn.init.zeros_(self.router.bias)
        if cfg.router_enable_expert_bias:
            # Selection-only bias (DeepSeek-V3); identical on every rank, saved with the model.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
            self._bias_tokens_per_expert = torch.zeros(cfg.num_experts)
        self._jitter_calls = 0

    def route(self, x_TD: Tensor, tokens: TokenInfo) -> tuple[Routing, None]:
        if self.training and self.cfg.input_jitter_eps > 0:
            x_TD = x_TD * self._jitter(x_TD)
        logits_TE = F.linear(x_TD.float(), *(reduce_grad(p, self.groups.sp_group).float()
                                              for p in self.router.parameters()))
        bias_E = getattr(self, "expert_bias", None)
        skip = 0 if self.training else self.cfg.drop_top_ranks  # an evaluation-only robustness test
        routing = topk_route(logits_TE, self.cfg.router_topk, self.cfg.router_pre_softmax, tokens.valid_T, bias_E,
                             skip)
        if self.cfg.router_gate == "unit_st":
            # Value 1 (an upcycled layer starts equal to the dense FFN); the router still gets p's gradient.
            routing = dataclasses.replace(routing, weight_N=routing.weight_N / routing.weight_N.detach())
        if bias_E is not None and self.training:
            counts_E = routing.tokens_per_expert().float()
            self._bias_tokens_per_expert = self._bias_tokens_per_expert.to(counts_E.device) + counts_E
        return routing, None

    def _jitter(self, x_TD: Tensor) -> Tensor:
        """U(1 - eps, 1 + eps) factors from the layer's own stream (routing never draws from the global RNG)."""
        self._jitter_calls += 1
        gen = torch.Generator(device=x_TD.device).manual_seed(
            self.shape.seed + 65537 * self.shape.layer_number + self._jitter_calls)
        eps = self.cfg.input_jitter_eps
        noise = torch.rand(x_TD.shape, generator=gen, device=x_TD.device, dtype=x_TD.dtype)
        return 1.0 - eps + 2.0 * eps * noise

    @torch.no_grad()
    def finish_step(self) -> None:
        """Aux-loss-free balancing: bias += rate * sign(mean load - load), loads summed over every rank."""
        super().finish_step()
        if not hasattr(self, "expert_bias"):
            return
        counts_E = all_reduce_sum(self._bias_tokens_per_expert.to(self.expert_bias.device), self.groups.tp_dp_group)
        self.expert_bias += self.cfg.router_bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        self._bias_tokens_per_expert = torch.zeros_like(counts_E)
