"""The plug-in contract of an MoE variant, and the parameter arithmetic the variants share (L0: no torch).

A variant is one `Variant` record in its own folder (megamoe/variants/<name>/__init__.py), listed in
megamoe.variants.VARIANTS. The record says everything the rest of megamoe needs to know about it: the config
class that reads its `moe:` keys and the checks they get, the layer built in each MoE slot, what changes in the
megatron layer spec around it, the counts the planner and the comparison use, and how it exports to Hugging Face.
Parts that need torch or megatron are named by reference ("module:attribute", imported on first use) so that the
config layer can read the registry without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from megamoe.config.loader import ConfigError
from megamoe.config.tree import ModelConfig, MoEConfig, RunConfig

Ref = str | Callable[..., Any] | type
"""A class or function, or its "package.module:attribute" path (imported when first used)."""


def resolve(ref: Ref) -> Any:
    """The object a Ref names."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def fail(message: str) -> None:
    """A user mistake in the moe: section (one line: key, value, fix)."""
    raise ConfigError(message)


def no_checks(moe: MoEConfig, cfg: RunConfig) -> None:
    """A variant without checks of its own."""


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One MoE variant: everything megamoe needs to know about it, declared in one place."""

    name: str
    """The `moe.variant` key."""
    config: type[MoEConfig]
    """The MoEConfig subclass that reads the rest of the `moe:` section."""
    layer: Ref
    """The torch.nn.Module in each MoE slot: `layer(moe_cfg, LayerShape, ParallelGroups)`, forward(x_TD, TokenInfo)
    -> y_TD. Its MoELayer submodules (itself, or sub-layers) carry statistics and the per-step hooks."""
    experts_per_token: Callable[[MoEConfig], float]
    """Routed copies per token of one MoE (sub-)layer, on average: the planner's activations and all-to-all."""
    layer_params: Callable[[MoEConfig, ModelConfig, int], tuple[int, int]]
    """(dense, expert) parameters of one MoE layer on a rank that holds `num_local` of the experts."""
    ffn_madds: Callable[[MoEConfig, ModelConfig], int]
    """Multiply-adds per token of one MoE layer (routers included): the comparison's equal-compute measure."""
    copy_madds: Callable[[MoEConfig, ModelConfig], int] | None = None
    """Multiply-adds of one routed copy of a token: the FLOP ledger moves ffn_madds by this much per copy the
    training run actually made above or below `experts_per_token` (dropped copies, DA-MoE's realised K). None:
    the nominal count stands."""
    step_madds: Callable[[MoEConfig, ModelConfig], int] | None = None
    """Multiply-adds of one MoE layer's forward done once per optimizer step, not per token (MPOE rebuilds its
    expert matrices from the MPO tensors); the ledger spreads them over the step's tokens."""
    check: Callable[[MoEConfig, RunConfig], None] = no_checks
    """The variant's own checks of a whole config, at start-up (raise ConfigError through `fail`)."""
    sublayers: int = 1
    """MoE sub-layers per MoE layer (each routes, balances and dispatches its own copies)."""
    all_to_all: bool = True
    """Under expert parallelism tokens travel to their experts through the shared all-to-all dispatcher
    (False: the layer moves tokens its own way)."""
    owns_pre_mlp_norm: bool = False
    """The layer normalises its inputs itself: the block's pre-MLP norm becomes an identity."""
    megatron_spec: Ref | None = None
    """`hook(layer_spec, cfg) -> dict`: changes the megatron layer spec of a block holding this variant (e.g. its
    attention) and returns extra keyword arguments of the MLP-slot adapter (models/moe_mlp.py)."""
    hf_native: bool = False
    """Native transformers classes (Mixtral, Qwen2-MoE) can express it; else it exports as megamoe's custom code."""
    hf_options: Ref | None = None
    """`hook(moe_cfg, prefix, state_dict) -> dict`: options the custom code needs beyond the moe: section, read off
    the weights of the first MoE layer (names under `prefix`)."""
    upcycle_overrides: tuple[str, ...] | None = None
    """Overrides applied before the user's when a dense checkpoint is upcycled into this variant (its experts
    start as the dense FFN); None: the variant cannot be upcycled."""
    study: Ref | None = None
    """Its part of the variant comparison (megamoe/studies/compare.py): a `Study`."""


@dataclass(frozen=True, kw_only=True)
class Study:
    """A variant's runs in the comparison, the papers' evaluations of them and the claims judged on them."""

    runs: dict[str, list[str]]
    """Run name -> the moe/model overrides on top of the dense baseline (at equal active FFN compute)."""
    quick: dict[str, list[str]] = field(default_factory=dict)
    """Run name -> extra overrides of a quick (test) comparison."""
    evaluate: Ref | None = None
    """`hook(run_name, trainer, final_metrics, log_dir) -> dict`: the paper's own evaluations of a trained run."""
    claims: Callable[[dict], list[tuple[str, bool, str]]] | None = None
    """`claims(runs by name) -> [(claim, holds, numbers)]` on the mean results of the runs present."""
    report: Callable[[dict], list[str]] | None = None
    """`report(runs by name) -> markdown lines` of the paper's evaluations."""
    trend: tuple[str, ...] = ()
    """Runs compared with dense at 1/4, 1/2 and all of the budget."""
    routers: tuple[str, ...] = ()
    """Runs whose routers' split of the domains is measured (data with several held-out sets)."""
    gaps: tuple[tuple[str, str, float], ...] = ()
    """(run, baseline, allowed): the comparisons its claims make, 'run's perplexity at most (1 + allowed) x the
    baseline's', followed along the run: how the gap moves with tokens, and the budget at which a claim that does
    not hold yet would if the trend held."""


# ---- parameter arithmetic shared by the variants (megamoe's experts and routers, unsharded) ----

def expert_width(moe: MoEConfig, model: ModelConfig) -> int:
    """FFN width of one routed expert."""
    return moe.ffn_hidden_size or model.ffn_hidden_size or 4 * model.hidden_size


def mlp_params(model: ModelConfig, width: int, tp: int = 1) -> int:
    """A dense FFN of `width` (megatron's MLP: fc1 sharded by columns, fc2 by rows)."""
    h, fc1 = model.hidden_size, (2 if model.swiglu else 1) * width
    bias = (fc1 // tp + h) if model.add_bias_linear else 0
    return (fc1 * h + h * width) // tp + bias


def expert_params(model: ModelConfig, width: int) -> int:
    """One routed or shared expert of `width`: megamoe's experts have no biases, whatever
    model.add_bias_linear says."""
    return (2 if model.swiglu else 1) * width * model.hidden_size + model.hidden_size * width


def router_params(moe: MoEConfig, model: ModelConfig, bias: bool) -> int:
    return moe.num_experts * model.hidden_size + (moe.num_experts if bias else 0)


def shared_expert_params(moe: MoEConfig, model: ModelConfig) -> int:
    """The shared expert and its combination weights ('gate': sigmoid(x w), 'residual': Linear(d, 2))."""
    width, h = moe.shared_expert_intermediate_size, model.hidden_size
    if not width:
        return 0
    return expert_params(model, width) + {"add": 0, "gate": h, "residual": 2 * h + 2}[moe.shared_expert_combine]


def routed_layer_params(moe: MoEConfig, model: ModelConfig, num_local: int, router_bias: bool) -> tuple[int, int]:
    """A routed MoE layer of megamoe's experts: router and shared expert (dense), this rank's routed experts."""
    dense = router_params(moe, model, router_bias) + shared_expert_params(moe, model)
    return dense, num_local * expert_params(model, expert_width(moe, model))


def routed_copy_madds(moe: MoEConfig, model: ModelConfig) -> int:
    """One routed SwiGLU expert applied to one token."""
    return 3 * model.hidden_size * expert_width(moe, model)


def routed_ffn_madds(moe: MoEConfig, model: ModelConfig, experts_per_token: float) -> int:
    """Router, `experts_per_token` routed SwiGLU experts and the shared expert, per token."""
    h = model.hidden_size
    shared = 3 * h * moe.shared_expert_intermediate_size if moe.shared_expert_intermediate_size else 0
    return int(h * moe.num_experts + experts_per_token * routed_copy_madds(moe, model) + shared)
