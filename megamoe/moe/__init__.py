"""Mixture-of-Experts layers in plain PyTorch (L2: imports neither megatron nor DeepSpeed)."""

from __future__ import annotations

import torch

from megamoe.config import MoEConfig
from megamoe.moe.layer import LayerShape, MoELayer
from megamoe.moe.variants import cartesian, dynamic, mpoe, peer, topk
from megamoe.parallel.groups import ParallelGroups

VARIANTS: dict[str, type[torch.nn.Module]] = {
    "topk": topk.TopKMoE,  # Switch / GShard / Mixtral, fine-grained + shared experts
    "dynamic": dynamic.DynamicMoE,  # DA-MoE: experts per token from attention importance
    "peer": peer.PEERMoE,  # product-key retrieval over ~1M single-neuron experts
    "cartesian": cartesian.CartesianMoE,  # two sequential sub-expert layers: Cartesian-product experts
    "mpo": mpoe.MPOEMoE,  # MPOE: experts as matrix product operators sharing one central tensor
}


def build_moe(cfg: MoEConfig, shape: LayerShape, groups: ParallelGroups) -> torch.nn.Module:
    """The MoE layer of variant cfg.variant for one layer of the model: forward(x_TD, TokenInfo) -> y_TD; its
    MoELayer submodules (itself, or CartesianMoE's two sub-layers) carry statistics and the per-step hooks."""
    if cfg.variant not in VARIANTS:
        raise ValueError(f"moe.variant={cfg.variant!r} is unknown; choose one of {sorted(VARIANTS)}")
    return VARIANTS[cfg.variant](cfg, shape, groups)


__all__ = ["VARIANTS", "LayerShape", "MoELayer", "build_moe"]
