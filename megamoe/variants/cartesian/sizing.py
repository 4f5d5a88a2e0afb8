"""Equal-size comparison of CartesianMoE with its baselines (arXiv:2410.16077 Fig. 1; docs/variants.md §5.3).

From one budget (model width d, dense FFN width d_ff, N experts) build:
  (a) top-2 over N experts of width d_ff;
  (b) fine-grained: top-4 over 2N experts of width d_ff/2, plus a shared expert of width d_ff;
  (c) Cartesian: top-2 x top-2 over N experts of width d_ff/2 in each of two sub-layers, plus a shared expert of
      width d_ff/2 in each.
Routed parameters, total and active, are equal in all three; shared parameters are equal in (b) and (c) ((a) has
none, as in the paper). Counts come from the layers themselves, not from a formula.
"""

from __future__ import annotations

import torch

from megamoe.config import MoEConfig
from megamoe.moe.sizing import LayerSize, layer_size
from megamoe.variants.cartesian import CartesianMoEConfig
from megamoe.variants.topk import TopKMoEConfig


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
