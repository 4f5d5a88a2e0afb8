"""MPOE (arXiv:2203.01104): experts as matrix product operators sharing one central tensor per matrix
(docs/variants.md §6).

Files: layer.py (the layer and its experts), operators.py (MPO decomposition and contraction), shapes.py (the
factorisations, torch-free), sizing.py (its parameters against Switch's), study.py (its runs in the comparison).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megamoe.config.tree import ModelConfig, RunConfig
from megamoe.variants.base import (
    Variant,
    expert_width,
    fail,
    routed_copy_madds,
    routed_ffn_madds,
    router_params,
    shared_expert_params,
)
from megamoe.variants.mpo.shapes import MPOShape, auto_shape
from megamoe.variants.topk import TopKMoEConfig, check_topk


@dataclass(kw_only=True, frozen=True)
class MPOEMoEConfig(TopKMoEConfig):
    """MPOE (arXiv:2203.01104): every expert matrix is a matrix product operator whose central tensor is shared
    by all experts of the layer and whose auxiliary tensors are the expert's own (docs/variants.md §6). Defaults are
    the from-scratch preset; tools/upcycle.py writes the upcycling preset (p_mask=1, aux_loss_coeff=0)."""

    variant: str = "mpo"
    """The MoE layer (this class reads moe.variant=mpo)."""
    router_topk: int = 1
    """Switch top-1 (the paper's router); other k allowed with router_gate=weights."""
    router_pre_softmax: bool = True
    """The chosen expert's probability under the softmax over all experts (Switch)."""
    router_bias: bool = True
    """Switch's router is a Linear(d, E) with bias."""
    router_gate: Literal["weights", "unit_st"] = "unit_st"
    """Value-1 straight-through gate p / stopgrad(p) on the expert's output. A named deviation: the released code
    scales the expert's input, which gives the same values but, with SwiGLU or GELU experts, another router gradient
    (docs/variants.md §6)."""
    mpo_num_tensors: int = 5
    """Local tensors n per matrix (odd; the central one is number (n+1)/2)."""
    mpo_shapes: dict[str, list[list[int]]] | None = None
    """Factorisation per matrix, {name: [[i_1..i_n], [j_1..j_n]]} over out (i) and in (j) dims; names are
    gate, up, down (SwiGLU) or fc1, fc2. Missing names: near-equal factors, the largest in the middle."""
    mpo_max_bond: int | None = None
    """Truncation D of every bond; None: exact (bonds min(left, right))."""
    p_mask: float = 0.5
    """Probability that a step's gradient of a central tensor is masked (drawn per step, layer and matrix,
    identically on every rank). 1.0 freezes the central tensors (the upcycling preset); 0 never masks."""
    mask_granularity: Literal["tensor", "element"] = "tensor"
    """Mask the whole central gradient, or each element (kept ones scaled by 1 / (1 - p_mask), Child-Tuning)."""
    aux_init_noise_std: float = 0.0
    """From-scratch initialisation: experts start as the same decomposed dense FFN, plus this noise on their
    auxiliary tensors (0: identical experts, the paper's upcycling)."""
    mpo_lr_mult: float = 1.0
    """Learning-rate multiplier of the MPO tensors (central and auxiliary; the released --mpo_lr)."""



def mpo_matrices(ffn_hidden_size: int, hidden_size: int, swiglu: bool) -> dict[str, tuple[int, int]]:
    """Each expert matrix an MPOE layer decomposes: name -> (rows, cols) in nn.Linear's [out, in] layout."""
    if swiglu:
        return {"gate": (ffn_hidden_size, hidden_size), "up": (ffn_hidden_size, hidden_size),
                "down": (hidden_size, ffn_hidden_size)}
    return {"fc1": (ffn_hidden_size, hidden_size), "fc2": (hidden_size, ffn_hidden_size)}


def check_mpo(moe: MPOEMoEConfig, cfg: RunConfig) -> None:
    check_topk(moe, cfg)
    n = moe.mpo_num_tensors
    if n < 3 or n % 2 == 0:
        fail(f"moe.mpo_num_tensors={n} must be odd and >= 3 (a central tensor with the same number on each side)")
    if not 0.0 <= moe.p_mask <= 1.0:
        fail(f"moe.p_mask={moe.p_mask} must be in [0, 1] (1 freezes the central tensors, 0 never masks)")
    if moe.mask_granularity == "element" and moe.p_mask == 1.0:
        fail("moe.mask_granularity=element needs moe.p_mask < 1 (kept elements are scaled by 1/(1 - p_mask)); "
             "p_mask=1 freezes the central tensors with either granularity, use mask_granularity=tensor")
    if moe.mpo_max_bond is not None and moe.mpo_max_bond < 1:
        fail(f"moe.mpo_max_bond={moe.mpo_max_bond} must be >= 1 (null: exact MPO)")
    if moe.aux_init_noise_std < 0 or moe.mpo_lr_mult <= 0:
        fail(f"moe.aux_init_noise_std={moe.aux_init_noise_std} must be >= 0 and moe.mpo_lr_mult={moe.mpo_lr_mult} "
             "> 0")
    matrices = mpo_matrices(expert_width(moe, cfg.model), cfg.model.hidden_size, cfg.model.swiglu)
    for name, shape in (moe.mpo_shapes or {}).items():
        if name not in matrices:
            fail(f"moe.mpo_shapes has no matrix {name!r}; this model's experts have {', '.join(matrices)}")
        _check_mpo_shape(name, shape, matrices[name], n)


def _check_mpo_shape(name: str, shape: object, dims: tuple[int, int], n: int) -> None:
    example = f"moe.mpo_shapes.{name}=[[i_1,...,i_{n}],[j_1,...,j_{n}]] with prod(i)={dims[0]}, prod(j)={dims[1]}"
    ok = (isinstance(shape, list) and len(shape) == 2
          and all(isinstance(f, list) and len(f) == n and all(isinstance(x, int) and x >= 1 for x in f) for f in shape))
    if not ok or math.prod(shape[0]) != dims[0] or math.prod(shape[1]) != dims[1]:
        fail(f"moe.mpo_shapes.{name}={shape!r} does not factor the [{dims[0]}, {dims[1]}] matrix into "
             f"{n} (out, in) factors; use {example}")


def matrix_shapes(moe: MPOEMoEConfig, width: int, hidden_size: int, swiglu: bool) -> dict[str, MPOShape]:
    """The factorisation of every expert matrix: moe.mpo_shapes where given, else the derived one."""
    given = moe.mpo_shapes or {}
    return {name: MPOShape(i=tuple(given[name][0]), j=tuple(given[name][1]), max_bond=moe.mpo_max_bond)
            if name in given else auto_shape(rows, cols, moe.mpo_num_tensors, moe.mpo_max_bond)
            for name, (rows, cols) in mpo_matrices(width, hidden_size, swiglu).items()}


def mpo_layer_params(moe: MPOEMoEConfig, model: ModelConfig, num_local: int) -> tuple[int, int]:
    """Router, central tensors (one per matrix, shared by the layer's experts) and shared expert (dense); the
    auxiliary tensors of this rank's experts."""
    shapes = matrix_shapes(moe, expert_width(moe, model), model.hidden_size, model.swiglu).values()
    dense = router_params(moe, model, moe.router_bias) + sum(s.central_size for s in shapes)
    return dense + shared_expert_params(moe, model), num_local * sum(s.auxiliary_size for s in shapes)


def mpo_rebuild_madds(moe: MPOEMoEConfig, model: ModelConfig) -> int:
    """Rebuilding every expert matrix of one layer from its MPO tensors, once per optimizer step."""
    shapes = matrix_shapes(moe, expert_width(moe, model), model.hidden_size, model.swiglu).values()
    return moe.num_experts * sum(s.reconstruct_madds for s in shapes)


def mpo_hf_options(moe: MPOEMoEConfig, prefix: str, state: dict) -> dict:
    """The custom code rebuilds the experts from their MPO tensors: the shape of each, read off the weights."""
    shapes: dict[str, dict[int, list[int]]] = {}
    for name, tensor in state.items():
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split(".")
        if len(parts) == 2 and parts[0] == "experts" and "_aux" in parts[1]:
            matrix, k = parts[1].rsplit("_aux", 1)
            if k.isdigit():
                shapes.setdefault(matrix, {})[int(k) - 1] = list(tensor.shape[1:])
        elif len(parts) == 3 and parts[0] == "mpo" and parts[2] == "central":
            shapes.setdefault(parts[1], {})[(moe.mpo_num_tensors - 1) // 2] = list(tensor.shape)
    return {"mpo_tensor_shapes": {m: [by_k[k] for k in sorted(by_k)] for m, by_k in shapes.items()}}


VARIANT = Variant(
    name="mpo", config=MPOEMoEConfig, layer="megamoe.variants.mpo.layer:MPOEMoE", check=check_mpo,
    experts_per_token=lambda moe: moe.router_topk, layer_params=mpo_layer_params,
    ffn_madds=lambda moe, model: routed_ffn_madds(moe, model, moe.router_topk), hf_options=mpo_hf_options,
    copy_madds=routed_copy_madds, step_madds=mpo_rebuild_madds,
    # Upcycling (docs/variants.md §6.4, §6.5): central tensors frozen, no balancing loss.
    upcycle_overrides=("moe.p_mask=1.0", "moe.aux_loss_coeff=0.0"), study="megamoe.variants.mpo.study:STUDY")
