"""DA-MoE (arXiv:2409.06669): a variable number of experts per token, from token importance (docs/variants.md §3).

Files: layer.py (the MoE layer), importance.py (importance and K in plain PyTorch), megatron.py (the attention
core that measures the attention each token receives), study.py (its runs in the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megamoe.config.tree import ModelConfig, MoEConfig, RunConfig
from megamoe.variants.base import Variant, fail, routed_copy_madds, routed_ffn_madds, routed_layer_params


@dataclass(kw_only=True, frozen=True)
class DynamicMoEConfig(MoEConfig):
    """DA-MoE (arXiv:2409.06669): each token's number of experts K from its importance (docs/variants.md §3)."""

    variant: str = "dynamic"
    """The MoE layer (this class reads moe.variant=dynamic)."""

    importance_mode: Literal["attention_received", "predicted"] = "attention_received"
    """attention_received: the attention each token receives in the same block (the paper; needs
    model.objective=masked_lm). predicted: a head on the token's own hidden state predicts it (a named,
    causal-safe deviation for GPT), trained toward the attention-received target by an MSE loss."""
    normalize: Literal["max", "minmax", "rank", "softmax"] = "max"
    """Per-sequence normalisation of importance to [0, 1]."""
    softmax_temperature: float = 1.0
    """Temperature of normalize=softmax (values scaled so the largest is 1)."""
    k_min: int = 1
    """Fewest experts a (valid) token gets; 0 allowed."""
    k_max: int = 4
    """Most experts a token gets: K = clamp(ceil(s K_max), K_min, K_max)."""
    budget: Literal["none", "batch", "running"] = "none"
    """Match a mean K: 'batch' exactly per micro-batch (couples tokens: bidirectional only), 'running' by a
    scale calibrated over past micro-batches (causal-safe)."""
    budget_k_mean: float = 2.0
    """The target mean K of a budget."""
    budget_momentum: float = 0.95
    """budget=running: c <- momentum c + (1 - momentum) c_batch."""
    renormalize: Literal["k>1", "always", "never"] = "k>1"
    """Renormalise the chosen experts' probabilities: 'k>1' makes K = 1 Switch and K = k Mixtral exactly."""
    predictor_loss_coeff: float = 1.0
    """importance_mode=predicted: weight gamma of the MSE loss of the importance head."""
    target_norm: Literal["count", "uniform_relative"] = "count"
    """predicted: divide attention received by the number of queries that see the token ('count'), or
    weight queries by their key count so uniform causal attention gives 1 ('uniform_relative')."""



CAUSAL_ATTENTION_RECEIVED = (
    "moe.importance_mode='attention_received' needs bidirectional self-attention, but the model's attention mask "
    "is causal (model.objective=causal_lm). Under causal attention the attention received by token j sums over "
    "queries i >= j, so it is computed from future tokens; routing token j on it leaks future information into "
    "position j's output during training, and it cannot be computed during incremental decoding. Use "
    "moe.importance_mode=predicted (a documented deviation from the paper) or model.objective=masked_lm")


def check_dynamic(moe: DynamicMoEConfig, cfg: RunConfig) -> None:
    causal = cfg.model.objective == "causal_lm"
    if causal and moe.importance_mode == "attention_received":
        fail(CAUSAL_ATTENTION_RECEIVED)
    if causal and moe.budget == "batch":
        fail("moe.budget=batch matches the mean K over each micro-batch, so a token's K depends on later tokens; "
             "with causal attention (model.objective=causal_lm) use moe.budget=running or none")
    if moe.importance_mode == "predicted" and moe.budget == "batch":
        # The batch budget ranks the whole micro-batch's attention importance (every TP slice), which the predictor
        # replaces: K would follow the attention target in training and have no scores at evaluation.
        fail("moe.budget=batch with moe.importance_mode=predicted: the batch budget ranks the attention importance "
             "of the whole micro-batch, which the predictor replaces; use moe.budget=running or none with the "
             "predictor, or importance_mode=attention_received (masked_lm) with the batch budget")
    if not 0 <= moe.k_min <= moe.k_max or moe.k_max < 1 or moe.k_max > moe.num_experts:
        fail(f"moe.k_min={moe.k_min}, moe.k_max={moe.k_max} must satisfy 0 <= k_min <= k_max <= "
             f"moe.num_experts={moe.num_experts} and k_max >= 1")
    if moe.budget != "none" and not moe.k_min <= moe.budget_k_mean <= moe.k_max:
        fail(f"moe.budget_k_mean={moe.budget_k_mean} must lie between moe.k_min={moe.k_min} and "
             f"moe.k_max={moe.k_max}")
    if moe.softmax_temperature <= 0 or not 0 <= moe.budget_momentum < 1:
        fail(f"moe.softmax_temperature={moe.softmax_temperature} must be > 0 and moe.budget_momentum="
             f"{moe.budget_momentum} in [0, 1)")


def mean_experts_per_token(moe: DynamicMoEConfig) -> float:
    """The budget's mean K, or the middle of [k_min, k_max] without a budget (an estimate)."""
    return moe.budget_k_mean if moe.budget != "none" else (moe.k_min + moe.k_max) / 2


def dynamic_layer_params(moe: DynamicMoEConfig, model: ModelConfig, num_local: int) -> tuple[int, int]:
    """Router, shared expert and the importance head of predicted mode (dense), this rank's experts."""
    head = model.hidden_size + 1 if moe.importance_mode == "predicted" else 0
    dense, experts = routed_layer_params(moe, model, num_local, router_bias=False)
    return dense + head, experts


VARIANT = Variant(
    name="dynamic", config=DynamicMoEConfig, layer="megamoe.variants.dynamic.layer:DynamicMoE", check=check_dynamic,
    experts_per_token=mean_experts_per_token, layer_params=dynamic_layer_params,
    ffn_madds=lambda moe, model: routed_ffn_madds(moe, model, mean_experts_per_token(moe)),
    copy_madds=routed_copy_madds,
    megatron_spec="megamoe.variants.dynamic.megatron:layer_spec", upcycle_overrides=(),
    study="megamoe.variants.dynamic.study:STUDY")
