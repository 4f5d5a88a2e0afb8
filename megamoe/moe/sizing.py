"""Parameter arithmetic of the research variants, counted on the layers themselves.

MPOE against Switch (variants.md §6.5): the MPOE layer's parameters (central tensors once, auxiliary tensors
per expert, router) against a Switch layer with the same experts, router and expert width.

Equal-size comparison of CartesianMoE with its baselines (arXiv:2410.16077 Fig. 1; variants.md §5.3).

From one budget (model width d, dense FFN width d_ff, N experts) build:
  (a) top-2 over N experts of width d_ff;
  (b) fine-grained: top-4 over 2N experts of width d_ff/2, plus a shared expert of width d_ff;
  (c) Cartesian: top-2 x top-2 over N experts of width d_ff/2 in each of two sub-layers, plus a shared expert of
      width d_ff/2 in each.
Routed parameters, total and active, are equal in all three; shared parameters are equal in (b) and (c) ((a) has
none, as in the paper). Counts come from the layers themselves, not from a formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.config import CartesianMoEConfig, MoEConfig, MPOEMoEConfig, TopKMoEConfig
from megamoe.moe.experts import SharedExperts
from megamoe.moe.layer import LayerShape, MoELayer
from megamoe.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class LayerSize:
    routed_total: int
    routed_active: int
    shared: int
    other: int
    """Routers, shared-expert gates and sub-layer norms (not part of the comparison)."""


def comparison_configs(ffn_hidden_size: int, num_experts: int) -> dict[str, MoEConfig]:
    """The three configurations of the comparison, keyed (a) top2, (b) fine_grained, (c) cartesian."""
    if ffn_hidden_size % 2:
        raise ValueError(f"ffn_hidden_size={ffn_hidden_size} must be even: (b) and (c) use experts of width d_ff/2")
    half = ffn_hidden_size // 2
    return {
        "top2": TopKMoEConfig(num_experts=num_experts, router_topk=2, ffn_hidden_size=ffn_hidden_size),
        "fine_grained": TopKMoEConfig(num_experts=2 * num_experts, router_topk=4, ffn_hidden_size=half,
                                      shared_expert_intermediate_size=ffn_hidden_size,
                                      shared_expert_combine="residual"),
        "cartesian": CartesianMoEConfig(num_experts=num_experts, router_topk=2, ffn_hidden_size=half,
                                        shared_expert_intermediate_size=half),
    }


def overrides(cfg: MoEConfig) -> list[str]:
    """The `moe.*=value` overrides that select `cfg` on top of a dense configuration."""
    keys = ["variant", "num_experts", "router_topk", "ffn_hidden_size", "shared_expert_intermediate_size"]
    if cfg.shared_expert_intermediate_size:
        keys.append("shared_expert_combine")
    return [f"moe.{key}={getattr(cfg, key)}" for key in keys if getattr(cfg, key) is not None]


def layer_size(cfg: MoEConfig, hidden_size: int) -> LayerSize:
    """Parameter counts of the MoE layer `cfg` builds (one process, all experts)."""
    from megamoe.moe import build_moe

    shape = LayerShape(hidden_size=hidden_size, ffn_hidden_size=cfg.ffn_hidden_size, swiglu=True, init_std=0.02,
                       num_layers=1, layer_number=1, seed=0)
    layer = build_moe(cfg, shape, ParallelGroups.single_process())
    routed = shared = active = 0
    for module in layer.modules():
        if isinstance(module, MoELayer):
            size = sum(p.numel() for p in module.experts.parameters())
            routed += size
            active += size // module.num_experts * module.nominal_k
        if isinstance(module, SharedExperts):
            shared += module.linear_fc1.numel() + module.linear_fc2.numel()
    total = sum(p.numel() for p in layer.parameters())
    return LayerSize(routed_total=routed, routed_active=active, shared=shared, other=total - routed - shared)


def equal_size_comparison(hidden_size: int, ffn_hidden_size: int, num_experts: int) -> dict[str, LayerSize]:
    """Sizes of the three configurations, checked equal as the comparison requires."""
    with torch.device("meta"):  # counting needs no memory
        sizes = {name: layer_size(cfg, hidden_size)
                 for name, cfg in comparison_configs(ffn_hidden_size, num_experts).items()}
    for field in ("routed_total", "routed_active"):
        values = {name: getattr(size, field) for name, size in sizes.items()}
        assert len(set(values.values())) == 1, f"{field} differs: {values}"
    assert sizes["fine_grained"].shared == sizes["cartesian"].shared, "shared experts of (b) and (c) differ"
    return sizes


@dataclass(frozen=True)
class MPOEReport:
    num_experts: int
    central: int
    """The central tensors (one per matrix, shared by all experts)."""
    auxiliary: int
    """The auxiliary tensors of all experts."""
    router: int
    switch: int
    """The Switch layer: all experts' full matrices (+ its router when counted)."""

    @property
    def mpoe(self) -> int:
        return self.central + self.auxiliary + self.router

    @property
    def ratio(self) -> float:
        """How many times fewer parameters the MPOE layer has than the Switch layer."""
        return self.switch / self.mpoe


def mpoe_parameter_report(cfg: MPOEMoEConfig, hidden_size: int, ffn_hidden_size: int, swiglu: bool,
                          count_router: bool = True) -> MPOEReport:
    """Parameters of the MPOE layer `cfg` and of a Switch layer (top-1, same router) with the same experts."""
    from megamoe.moe import build_moe

    shape = LayerShape(hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size, swiglu=swiglu, init_std=0.02,
                       num_layers=1, layer_number=1, seed=0)
    groups = ParallelGroups.single_process()
    mpoe = build_moe(cfg, shape, groups)  # decomposes its initial dense FFN: built for real
    switch_cfg = TopKMoEConfig(num_experts=cfg.num_experts, router_topk=1, router_pre_softmax=True,
                               router_bias=cfg.router_bias, ffn_hidden_size=cfg.ffn_hidden_size)
    with torch.device("meta"):
        switch = build_moe(switch_cfg, shape, groups)
    router = sum(p.numel() for p in mpoe.router.parameters()) if count_router else 0
    return MPOEReport(num_experts=cfg.num_experts, central=sum(m.central.numel() for m in mpoe.mpo.values()),
                      auxiliary=sum(p.numel() for p in mpoe.experts.parameters()), router=router,
                      switch=sum(p.numel() for p in switch.experts.parameters()) + router)
