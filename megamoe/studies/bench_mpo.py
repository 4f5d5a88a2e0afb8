"""Forward+backward time of MPOE experts, two ways (issue 7, docs/variants.md §6): rebuild every expert's matrices
from its MPO once per forward and run GEMMs (what MPOExperts does), or contract the tokens through the chain
of local tensors without forming any matrix (mpo.apply_chain); both against the GEMM floor, the same experts'
matrices as plain parameters (a Switch layer's experts).

Every method gets the same tokens, the same per-expert row counts (top-1, balanced), the same output gradient
and the same tensors; `rel_diff` = max |out - out_rebuild| / max |out_rebuild| checks they compute one thing.
Shapes: R routed rows, D hidden, E local experts, n rows of one expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from megamoe.moe import build_moe
from megamoe.moe.experts import expert_ffn, ffn_activation
from megamoe.moe.layer import LayerShape
from megamoe.parallel.groups import ParallelGroups
from megamoe.studies.bench import Timing, time_interleaved
from megamoe.variants.mpo import MPOEMoEConfig
from megamoe.variants.mpo.layer import MPOExperts, aux_name
from megamoe.variants.mpo.operators import apply_chain


@dataclass(kw_only=True, frozen=True)
class MPOBenchShape:
    hidden_size: int
    ffn_hidden_size: int
    swiglu: bool
    num_experts: int
    num_rows: int
    """Routed rows R (tokens x top-1), spread evenly over the experts."""
    mpo_shapes: dict[str, list[list[int]]] | None = None
    """moe.mpo_shapes; None: the derived factorisation."""
    max_bond: int | None = None


T5_WI = [[4, 4, 8, 6, 4], [3, 4, 4, 4, 4]]
SHAPES = {
    "tiny": MPOBenchShape(hidden_size=128, ffn_hidden_size=352, swiglu=True, num_experts=8, num_rows=2048),
    "t5-base": MPOBenchShape(hidden_size=768, ffn_hidden_size=3072, swiglu=False, num_experts=8, num_rows=2048,
                             mpo_shapes={"fc1": T5_WI, "fc2": T5_WI[::-1]}),
    "t5-base-D16": MPOBenchShape(hidden_size=768, ffn_hidden_size=3072, swiglu=False, num_experts=8, num_rows=2048,
                                 mpo_shapes={"fc1": T5_WI, "fc2": T5_WI[::-1]}, max_bond=16),
}
METHODS = ("rebuild", "chain", "gemm-floor")


@dataclass(kw_only=True)
class MPOBenchRecord:
    shape: str
    method: str
    median_s: float
    min_s: float
    vs_floor: float
    rel_diff: float


def build_experts(shape: MPOBenchShape, seed: int) -> MPOExperts:
    cfg = MPOEMoEConfig(num_experts=shape.num_experts, mpo_shapes=shape.mpo_shapes, mpo_max_bond=shape.max_bond)
    layer = LayerShape(hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size, swiglu=shape.swiglu,
                       init_std=0.02, num_layers=1, layer_number=1, seed=seed)
    return build_moe(cfg, layer, ParallelGroups.single_process()).experts


def zero_grads(experts: MPOExperts) -> None:
    """Drop the auxiliary and the (layer-owned) central tensors' gradients, as zero_grad(set_to_none) does."""
    experts.zero_grad(set_to_none=True)
    for central in experts.central_tensors().values():
        central.grad = None


def chain_ffn(experts: MPOExperts, x_RD: Tensor, counts_e: Tensor) -> Tensor:
    """The experts' FFN by contracting each expert's rows through its chains (no matrix formed)."""
    centrals = experts.central_tensors()

    def apply(name: str, j: int, x: Tensor) -> Tensor:
        shape = experts.shapes[name]
        tensors = [centrals[name] if k == shape.center else getattr(experts, aux_name(name, k))[j]
                   for k in range(shape.n)]
        return apply_chain(x, tensors, shape)

    outs = []
    for j, x_nD in enumerate(x_RD.split(counts_e.tolist())):
        if experts.swiglu:
            h = torch.cat([apply("gate", j, x_nD), apply("up", j, x_nD)], dim=-1)
            outs.append(apply("down", j, ffn_activation(h, True)))
        else:
            outs.append(apply("fc2", j, ffn_activation(apply("fc1", j, x_nD), False)))
    return torch.cat(outs)


def method_forwards(experts: MPOExperts) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """x_RD, counts_e -> y_RD for each method; the floor's matrices are leaves copied from the rebuilt ones."""
    with torch.no_grad():
        w = experts.matrices()
    fc1, fc2 = (torch.cat([w["gate"], w["up"]], dim=1), w["down"]) if experts.swiglu else (w["fc1"], w["fc2"])
    fc1, fc2 = fc1.clone().requires_grad_(), fc2.clone().requires_grad_()
    return {"rebuild": experts.forward,
            "chain": lambda x, counts: chain_ffn(experts, x, counts),
            "gemm-floor": lambda x, counts: expert_ffn(x, counts, fc1, fc2, experts.swiglu, "off")}


def bench_shape(name: str, shape: MPOBenchShape, methods: list[str], timing: Timing, seed: int) -> list[MPOBenchRecord]:
    experts = build_experts(shape, seed)
    gen = torch.Generator().manual_seed(seed)
    x_RD = torch.randn(shape.num_rows, shape.hidden_size, generator=gen)
    grad_RD = torch.randn(shape.num_rows, shape.hidden_size, generator=gen) / shape.num_rows
    counts_e = torch.full((shape.num_experts,), shape.num_rows // shape.num_experts)
    counts_e[: shape.num_rows % shape.num_experts] += 1
    forwards = method_forwards(experts)

    def step(forward: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            zero_grads(experts)
            out = forward(x_RD, counts_e)
            out.backward(grad_RD)
            return out.detach()
        return run

    timed = time_interleaved({m: step(forwards[m]) for m in methods}, timing, ep_group=None)
    floor = timed["gemm-floor"].median_s if "gemm-floor" in timed else float("nan")
    reference = timed["rebuild"].out_TD if "rebuild" in timed else None
    records = []
    for method, t in timed.items():
        rel = float("nan") if reference is None else float((t.out_TD - reference).abs().max() / reference.abs().max())
        records.append(MPOBenchRecord(shape=name, method=method, median_s=t.median_s, min_s=t.min_s,
                                      vs_floor=t.median_s / floor, rel_diff=rel))
    return records


def validate(shape_names: list[str], methods: list[str]) -> None:
    if unknown := [s for s in shape_names if s not in SHAPES]:
        raise ValueError(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    if unknown := [m for m in methods if m not in METHODS]:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")


def run(shape_names: list[str], methods: list[str], timing: Timing | None = None,
        seed: int = 1234) -> list[MPOBenchRecord]:
    validate(shape_names, methods)
    timing = timing or Timing()
    return [r for name in shape_names for r in bench_shape(name, SHAPES[name], methods, timing, seed)]


def format_table(records: list[MPOBenchRecord]) -> str:
    lines = ["| shape | method | median ms | min ms | vs GEMM floor | rel_diff vs rebuild |",
             "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r.shape} | {r.method} | {1e3 * r.median_s:.2f} | {1e3 * r.min_s:.2f} | "
                     f"{r.vs_floor:.2f}x | {r.rel_diff:.1e} |")
    return "\n".join(lines)


def verdict(records: list[MPOBenchRecord]) -> list[str]:
    """Per shape: which of rebuild and chain is faster, by how much."""
    lines = []
    for shape in dict.fromkeys(r.shape for r in records):
        by = {r.method: r for r in records if r.shape == shape}
        if "rebuild" in by and "chain" in by:
            fast, slow = sorted((by["rebuild"], by["chain"]), key=lambda r: r.median_s)
            lines.append(f"{shape}: {fast.method} is faster, {slow.median_s / fast.median_s:.2f}x "
                         f"({fast.vs_floor:.2f}x the GEMM floor)")
    return lines


def as_dicts(records: list[MPOBenchRecord]) -> list[dict]:
    return [asdict(r) for r in records]
