"""Token-choice top-k routing: Switch (top-1), GShard (top-2), Mixtral (top-k), fine-grained + shared experts.

The family's base: CartesianMoE and MPOE extend its config and layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megamoe.config.tree import ModelConfig, MoEConfig, RunConfig
from megamoe.variants.base import Variant, fail, routed_copy_madds, routed_ffn_madds, routed_layer_params


@dataclass(kw_only=True, frozen=True)
class TopKMoEConfig(MoEConfig):
    """Token-choice top-k routing: Switch (top-1), GShard (top-2), Mixtral (top-k), fine-grained + shared."""

    router_topk: int = 2
    """Experts per token k."""
    router_pre_softmax: bool = False
    """True: weights are the full softmax's probabilities of the chosen experts (Switch, Qwen2-MoE).
    False: softmax over the chosen k logits, i.e. renormalised (Mixtral, GShard)."""
    input_jitter_eps: float = 0.0
    """Multiply router inputs by U(1 - eps, 1 + eps) while training (Switch); 0 disables it."""
    router_enable_expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection only."""
    router_bias_update_rate: float = 1e-3
    """Step of the expert-bias update per optimizer step."""
    router_bias: bool = False
    """Router Linear(d, E) with a trained bias (the Switch code MPOE builds on); false: bias-free (Megatron)."""
    router_gate: Literal["weights", "unit_st"] = "weights"
    """How the chosen expert's output is scaled: by the routing weight, or 'unit_st' = p / stopgrad(p) (value 1,
    the router still gets p's gradient; top-1 with router_pre_softmax only). unit_st keeps an upcycled layer
    equal to the dense FFN at the start."""



def check_topk(moe: TopKMoEConfig, cfg: RunConfig) -> None:
    if not 1 <= moe.router_topk <= moe.num_experts:
        fail(f"moe.router_topk={moe.router_topk} must be between 1 and moe.num_experts={moe.num_experts}")
    if moe.router_topk + moe.drop_top_ranks > moe.num_experts:
        fail(f"moe.drop_top_ranks={moe.drop_top_ranks} + moe.router_topk={moe.router_topk} exceeds "
             f"moe.num_experts={moe.num_experts}")
    if not 0 <= moe.input_jitter_eps < 1:
        fail(f"moe.input_jitter_eps={moe.input_jitter_eps} must be in [0, 1)")
    if moe.router_bias_update_rate < 0:
        fail(f"moe.router_bias_update_rate={moe.router_bias_update_rate} must be >= 0 (a negative rate pushes tokens "
             "toward the experts that already have the most)")
    if moe.router_gate == "unit_st" and (moe.router_topk != 1 or not moe.router_pre_softmax):
        fail(f"moe.router_gate=unit_st is a top-1 gate on the full softmax's probability: it needs "
             f"moe.router_topk=1 and moe.router_pre_softmax=true (got {moe.router_topk}, {moe.router_pre_softmax}); "
             "use moe.router_gate=weights for other routers")
    if moe.router_topk == 1 and not moe.router_pre_softmax:
        fail("moe.router_topk=1 with moe.router_pre_softmax=false weights each token's expert by a softmax over one "
             "logit, always 1: the router would get no gradient from the LM loss; set moe.router_pre_softmax=true "
             "(the chosen expert's probability: Switch, and the CartesianMoE authors' top-1 gate)")


def topk_layer_params(moe: TopKMoEConfig, model: ModelConfig, num_local: int) -> tuple[int, int]:
    """Router and shared expert (dense), this rank's routed experts."""
    return routed_layer_params(moe, model, num_local, moe.router_bias)


VARIANT = Variant(
    name="topk", config=TopKMoEConfig, layer="megamoe.variants.topk.layer:TopKMoE", check=check_topk,
    experts_per_token=lambda moe: moe.router_topk, layer_params=topk_layer_params,
    ffn_madds=lambda moe, model: routed_ffn_madds(moe, model, moe.router_topk), copy_madds=routed_copy_madds,
    hf_native=True, upcycle_overrides=(), study="megamoe.variants.topk.study:STUDY")
