"""Parameter counts of an MoE layer, counted on the layer itself (built on the meta device where it can be).

The variants' own sizing arguments use it: megamoe/variants/cartesian/sizing.py (CartesianMoE's equal-size
comparison with its baselines) and megamoe/variants/mpo/sizing.py (MPOE's parameters against Switch's).
"""

from __future__ import annotations

from dataclasses import dataclass

from megamoe.config import MoEConfig
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


def layer_size(cfg: MoEConfig, hidden_size: int) -> LayerSize:
    """Parameter counts of the MoE layer `cfg` builds (one process, all experts)."""
    from megamoe.moe import build_moe  # the package imports this module's siblings: import on use

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
