"""Mixture-of-Experts layers in plain PyTorch (L2: imports neither megatron nor DeepSpeed).

The shared pipeline (route -> dispatch -> experts -> combine) lives here; each variant's layer lives in its folder
under megamoe/variants and is built through the registry.
"""

from __future__ import annotations

import torch

from megamoe import variants
from megamoe.config import MoEConfig
from megamoe.moe.layer import LayerShape, MoELayer
from megamoe.parallel.groups import ParallelGroups


def build_moe(cfg: MoEConfig, shape: LayerShape, groups: ParallelGroups) -> torch.nn.Module:
    """The MoE layer of variant cfg.variant for one layer of the model: forward(x_TD, TokenInfo) -> y_TD; its
    MoELayer submodules (itself, or CartesianMoE's two sub-layers) carry statistics and the per-step hooks."""
    return variants.resolve(variants.of(cfg).layer)(cfg, shape, groups)


__all__ = ["LayerShape", "MoELayer", "build_moe"]
