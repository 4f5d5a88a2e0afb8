"""MPOE against Switch (docs/variants.md §6.5): the MPOE layer's parameters (central tensors once, auxiliary
tensors per expert, router) against a Switch layer with the same experts, router and expert width."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.moe import build_moe
from megamoe.moe.layer import LayerShape
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.mpo import MPOEMoEConfig
from megamoe.variants.topk import TopKMoEConfig


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
