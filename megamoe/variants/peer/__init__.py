"""PEER (arXiv:2407.04153): product-key retrieval over ~1M single-neuron experts (docs/variants.md §4).

Files: layer.py (the layer and its expert tables), product_keys.py (query norm and exact product-key top-k),
study.py (its runs in the comparison).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megamoe.config.tree import ModelConfig, MoEConfig, RunConfig
from megamoe.variants.base import Variant, fail


@dataclass(kw_only=True, frozen=True)
class PEERMoEConfig(MoEConfig):
    """PEER (arXiv:2407.04153): product-key retrieval over num_experts single-neuron experts (docs/variants.md §4).
    num_experts must be a perfect square; the expert tables are row-sharded over the expert-parallel group."""

    variant: str = "peer"
    """The MoE layer (this class reads moe.variant=peer)."""
    layer_freq: int | list[int] | Literal["middle"] = "middle"
    """PEER replaces the middle block's MLP by default (the paper's placement)."""
    router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "none"
    """PEER has no balancing loss: the query BatchNorm balances retrieval."""
    num_heads: int = 8
    """Retrieval heads h (each retrieves its own experts; outputs are summed)."""
    topk_per_head: int = 16
    """Experts per head k (h x k single-neuron experts per token)."""
    key_dim: int = 128
    """Query / product-key dimension d_k (even: two halves of d_k/2)."""
    shared_keys: bool = True
    """One pair of sub-key tables for all heads (the paper); False: per-head keys."""
    query_norm: Literal["batchnorm", "layernorm", "none"] = "batchnorm"
    """BatchNorm on the queries (the paper; statistics over valid tokens); layernorm is the causal-safe
    deviation (BatchNorm's batch statistics include later tokens of the sequence)."""
    gate: Literal["softmax", "sigmoid"] = "softmax"
    """Weights of a head's k experts: softmax over their scores (Alg. 1), or sigmoid of each (Eq. 2)."""
    chunk_tokens: int = 1024
    """Tokens per chunk of the expert computation: bounds its [tokens, h, k, d] gathered rows and gradient terms."""
    placement_seed: int = 0
    """Seed of the fixed permutation placing experts on table rows (stored in checkpoints)."""



def check_peer(moe: PEERMoEConfig, cfg: RunConfig) -> None:
    ep = cfg.parallel.expert_model_parallel_size
    side = math.isqrt(moe.num_experts)
    if side * side != moe.num_experts:
        fail(f"moe.num_experts={moe.num_experts} must be a perfect square for PEER's product keys, e.g. "
             f"{side * side} or {(side + 1) ** 2}")
    if moe.key_dim < 2 or moe.key_dim % 2:
        fail(f"moe.key_dim={moe.key_dim} must be even (queries split into two halves of key_dim/2)")
    if not 1 <= moe.topk_per_head <= side:
        fail(f"moe.topk_per_head={moe.topk_per_head} must be between 1 and sqrt(moe.num_experts)={side}")
    if moe.num_experts % ep:
        fail(f"moe.num_experts={moe.num_experts} rows cannot be split over parallel.expert_model_parallel_size="
             f"{ep}; use a divisor")
    if moe.num_heads < 1 or moe.chunk_tokens < 1:
        fail(f"moe.num_heads={moe.num_heads} and moe.chunk_tokens={moe.chunk_tokens} must be >= 1")
    if moe.expert_capacity_factor is not None or moe.shared_expert_intermediate_size:
        fail("moe.expert_capacity_factor and moe.shared_expert_intermediate_size do not apply to PEER (no "
             "capacity: retrieval is exact; no shared expert); leave them null")


def peer_layer_params(moe: PEERMoEConfig, model: ModelConfig, num_local: int) -> tuple[int, int]:
    """Sub-keys, query projection and query norm (dense); this rank's rows of the down and up tables."""
    h = model.hidden_size
    halves = (1 if moe.shared_keys else moe.num_heads) * math.isqrt(moe.num_experts) * moe.key_dim
    query = h * moe.num_heads * moe.key_dim
    norm = 0 if moe.query_norm == "none" else 2 * moe.num_heads * moe.key_dim
    return halves + query + norm, 2 * num_local * h


def peer_ffn_madds(moe: PEERMoEConfig, model: ModelConfig) -> int:
    """Query projection, scores against both sub-key halves, and h x k single-neuron experts (down and up)."""
    h, heads, key = model.hidden_size, moe.num_heads, moe.key_dim
    return h * heads * key + heads * 2 * math.isqrt(moe.num_experts) * key // 2 + heads * moe.topk_per_head * 2 * h


VARIANT = Variant(
    name="peer", config=PEERMoEConfig, layer="megamoe.variants.peer.layer:PEERMoE", check=check_peer,
    experts_per_token=lambda moe: moe.num_heads * moe.topk_per_head, layer_params=peer_layer_params,
    ffn_madds=peer_ffn_madds, copy_madds=lambda moe, model: 2 * model.hidden_size,  # a down dot, an up axpy
    all_to_all=False, study="megamoe.variants.peer.study:STUDY")
