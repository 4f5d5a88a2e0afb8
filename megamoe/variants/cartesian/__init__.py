"""CartesianMoE (arXiv:2410.16077): two sequential top-k sub-layers, whose composite experts form the Cartesian
product of the two sets (docs/variants.md §5).

Files: layer.py (the layer), sizing.py (its equal-size comparison with top-2 and fine-grained), study.py (its runs
in the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megamoe.config.tree import ModelConfig, RunConfig
from megamoe.variants.base import Variant, fail, routed_copy_madds, routed_ffn_madds
from megamoe.variants.topk import TopKMoEConfig, check_topk, topk_layer_params


@dataclass(kw_only=True, frozen=True)
class CartesianMoEConfig(TopKMoEConfig):
    """CartesianMoE (arXiv:2410.16077): two sequential sub-layers A then B, each a top-k MoE with its own
    norm, router, experts and shared expert; a token's composite expert is FFN_B o FFN_A (docs/variants.md §5)."""

    variant: str = "cartesian"
    """The MoE layer (this class reads moe.variant=cartesian)."""
    shared_expert_combine: Literal["add", "gate", "residual"] = "residual"
    """The authors' mix: c = softmax(Linear(d, 2)(x)) with bias; y = c0 routed + c1 shared."""
    drop_top_scope: Literal["a", "b", "both"] = "both"
    """The sub-layers moe.drop_top_ranks applies to."""



def check_cartesian(moe: CartesianMoEConfig, cfg: RunConfig) -> None:
    check_topk(moe, cfg)
    if cfg.model.hidden_dropout > 0:
        fail(f"moe.variant=cartesian needs model.hidden_dropout=0 (got {cfg.model.hidden_dropout}): the residual "
             "between its two sub-layers is inside the layer, without megatron's dropout")


def cartesian_layer_params(moe: CartesianMoEConfig, model: ModelConfig, num_local: int) -> tuple[int, int]:
    """Two top-k sub-layers, each with its own norm."""
    dense, experts = topk_layer_params(moe, model, num_local)
    return 2 * (dense + model.hidden_size), 2 * experts


VARIANT = Variant(
    name="cartesian", config=CartesianMoEConfig, layer="megamoe.variants.cartesian.layer:CartesianMoE",
    check=check_cartesian, experts_per_token=lambda moe: moe.router_topk, layer_params=cartesian_layer_params,
    ffn_madds=lambda moe, model: 2 * routed_ffn_madds(moe, model, moe.router_topk), sublayers=2,
    copy_madds=routed_copy_madds,
    owns_pre_mlp_norm=True, study="megamoe.variants.cartesian.study:STUDY")
