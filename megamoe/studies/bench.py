"""Forward+backward time of one MoE layer on CPU: megamoe (expert loop and grouped GEMM), megatron-core's stock
MoELayer, DeepSpeed's MoE, and the expert-GEMM floor; plus the bytes each all-to-all design moves.

Every implementation gets the same input, the same output gradient and the megamoe layer's weights (router
and experts copied), hence the same routing: time differences come from the code, not from the load.
`rel_diff` checks that claim: max |out - out_megamoe| / max |out_megamoe| on the last timed iteration.

Allocator: on a GPU the caching allocator hands freed blocks back; glibc returns large blocks (above its mmap
threshold, e.g. a 64 MB [T*k, D] activation) to the OS on free, and the next iteration page-faults them in again:
at the fine-grained shape that was up to half of the measured time and made medians vary 2x between runs.
tools/bench_moe.py and tools/bench_peer.py therefore run with megamoe.utils.GLIBC_REUSE (unless the caller set
those variables), the same for every implementation and for the floor.

Shapes: T tokens on this rank, D hidden, F expert width, E experts, e local experts, k experts per token,
N routed copies made on this rank, P expert-parallel ranks, I timed iterations, n rows of one expert.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from megamoe.config import ParallelConfig
from megamoe.moe.layer import TokenInfo
from megamoe.moe.routing import Routing
from megamoe.parallel.experts import ExpertPlacement
from megamoe.parallel.groups import ParallelGroups
from megamoe.studies.bench_impls import STEP_BUILDERS, build_megamoe_layer, floor_steps


@dataclass(kw_only=True, frozen=True)
class BenchShape:
    """One MoE layer to time."""

    num_tokens: int
    """T over all expert-parallel ranks (each rank routes T / P): EP=1 and EP=P runs do the same work."""
    hidden_size: int
    ffn_hidden_size: int
    """F: width of one SwiGLU expert (its first GEMM is D x 2F)."""
    num_experts: int
    topk: int

    def describe(self, name: str, ep_size: int) -> dict[str, int | str]:
        return {"name": name, "T": self.num_tokens, "D": self.hidden_size, "ffn": self.ffn_hidden_size,
                "E": self.num_experts, "k": self.topk, "EP": ep_size}


SHAPES: dict[str, BenchShape] = {
    "coarse": BenchShape(num_tokens=4096, hidden_size=512, ffn_hidden_size=1024, num_experts=8, topk=2),
    "fine": BenchShape(num_tokens=4096, hidden_size=512, ffn_hidden_size=256, num_experts=64, topk=8),
}
IMPLS = ("megamoe-loop", "megamoe-grouped", "megatron-core", "deepspeed")


@dataclass(kw_only=True, frozen=True)
class Timing:
    warmup: int = 2
    """Untimed iterations first (allocator, thread pools, first-touch of weights)."""
    iters: int = 5
    """Timed iterations; the record holds their median."""


@dataclass(kw_only=True)
class BenchRecord:
    """One (configuration, implementation). Bytes are per forward, summed over the EP ranks; backward moves
    as much again."""

    config: dict[str, int | str]
    impl: str
    fwd_bwd_s: float
    """Median over the timed iterations."""
    fwd_bwd_min_s: float
    """Fastest timed iteration: the least disturbed by other processes on a shared machine."""
    floor_s: float
    """The expert GEMMs alone, at this routing's per-expert row counts (slowest rank under EP)."""
    floor_balanced_s: float
    """The same GEMMs with every expert at the ideal n = T*k/E rows."""
    ratio_to_floor: float
    """fwd_bwd_s / floor_s."""
    min_ratio_to_floor: float
    """fwd_bwd_min_s / the floor's fastest iteration: steadier than the medians when the machine is shared."""
    a2a_bytes: int
    """Bytes the dispatch all-to-all sends to other ranks (combine sends as many back). megamoe: read from its
    dispatcher's send splits; others: from their design (megatron: every copy; DeepSpeed: E x capacity)."""
    ideal_a2a_bytes: int
    """Copies whose expert lives on another rank, times D times element size: sum(tokens * k * d) leaving."""
    ideal_a2a_bytes_with_local: int
    """Every routed copy, local ones included (one way): T*k*D*element size."""
    dedup_a2a_bytes: int
    """One row per (token, other rank holding any of its experts), one way: a deduplicating dispatcher."""
    rel_diff: float | None
    """max |out - out_megamoe| / max |out_megamoe|; None for megamoe-loop itself and the floor."""
    threads: int
    timing: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Traffic:
    """All-to-all bytes of one forward from the routing (group sums; 0 at EP=1)."""

    copies: int
    """Every copy to its expert's rank (megatron's alltoall dispatcher)."""
    padded: int
    """DeepSpeed: every rank sends E x capacity rows (capacity = largest per-rank expert count)."""
    ideal: int
    ideal_with_local: int
    dedup: int


def validate_bench(shape_names: list[str], impls: list[str], ep_size: int, world_size: int) -> None:
    """Command-line mistakes, before any process group exists."""
    if unknown := sorted(set(shape_names) - SHAPES.keys()):
        raise ValueError(f"configuration {unknown[0]!r} is unknown; choose from {sorted(SHAPES)}")
    if unknown := sorted(set(impls) - set(IMPLS)):
        raise ValueError(f"implementation {unknown[0]!r} is unknown; choose from {list(IMPLS)}")
    if ep_size != world_size:
        raise ValueError(f"--ep {ep_size} needs {ep_size} ranks but WORLD_SIZE={world_size}; launch with "
                         f"`torchrun --nproc_per_node {ep_size} tools/bench_moe.py --ep {ep_size}`")
    for name in shape_names:
        shape = SHAPES[name]
        if shape.num_experts % ep_size or shape.num_tokens % ep_size:
            raise ValueError(f"configuration {name!r} has E={shape.num_experts}, T={shape.num_tokens}: both must "
                             f"be divisible by --ep {ep_size}")


def setup(ep_size: int, impls: list[str], seed: int) -> ParallelGroups:
    """Groups and threads: no process group for megamoe alone at EP=1 (plain PyTorch), else megatron's."""
    torch.set_num_threads(threads_per_rank(ep_size))
    if ep_size == 1 and not {"megatron-core", "deepspeed"} & set(impls):
        torch.manual_seed(seed)
        return ParallelGroups.single_process()
    from megamoe.parallel.initialize import initialize

    return initialize(ParallelConfig(expert_model_parallel_size=ep_size), seed)  # also patches megatron for CPU


def threads_per_rank(ranks_per_node: int) -> int:
    # Timings need ranks x threads <= cores (docs/integration.md §13); an explicit OMP_NUM_THREADS wins.
    if "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, len(os.sched_getaffinity(0)) // ranks_per_node)


def run(shape_names: list[str], impls: list[str], *, ep_size: int = 1, timing: Timing | None = None,
        seed: int = 1234) -> list[BenchRecord]:
    """Every (configuration, implementation) plus one 'floor' record per configuration."""
    timing = timing or Timing()
    validate_bench(shape_names, impls, ep_size, int(os.environ.get("WORLD_SIZE", "1")))
    groups = setup(ep_size, impls, seed)
    return [record for name in shape_names
            for record in bench_shape(name, SHAPES[name], impls, groups, timing, seed)]


def bench_shape(name: str, shape: BenchShape, impls: list[str], groups: ParallelGroups, timing: Timing,
                seed: int) -> list[BenchRecord]:
    """The floor record, then one record per implementation."""
    x_TD, grad_TD = bench_inputs(shape, groups, seed)
    reference = build_megamoe_layer(shape, groups, grouped_gemm="off", seed=seed)
    with torch.no_grad():
        routing = reference.route(x_TD, TokenInfo())[0]
        reference_TD = reference(x_TD)
    steps = floor_steps(shape, routing, groups)
    steps.update({impl: STEP_BUILDERS[impl](reference, shape, groups, x_TD, grad_TD, seed) for impl in impls})
    timed = time_interleaved(steps, timing, groups.ep_group)
    traffic = measure_traffic(routing, groups, shape.hidden_size, x_TD.element_size())
    ours = megamoe_dispatch_bytes(reference, x_TD, routing, groups)
    floor = timed["floor"]
    records = []
    for impl in ["floor", *impls]:
        rel_diff = None if impl in ("floor", "megamoe-loop") else relative_difference(
            timed[impl].out_TD, reference_TD, groups.ep_group)
        a2a_bytes = {"floor": 0, "deepspeed": traffic.padded, "megatron-core": traffic.copies}.get(impl, ours)
        records.append(BenchRecord(
            config=shape.describe(name, groups.ep_size), impl=impl, fwd_bwd_s=timed[impl].median_s,
            fwd_bwd_min_s=timed[impl].min_s, floor_s=floor.median_s, floor_balanced_s=timed["floor-balanced"].median_s,
            ratio_to_floor=timed[impl].median_s / floor.median_s, min_ratio_to_floor=timed[impl].min_s / floor.min_s,
            a2a_bytes=a2a_bytes, ideal_a2a_bytes=traffic.ideal,
            ideal_a2a_bytes_with_local=traffic.ideal_with_local, dedup_a2a_bytes=traffic.dedup, rel_diff=rel_diff,
            threads=torch.get_num_threads(), timing=asdict(timing)))
    return records


def bench_inputs(shape: BenchShape, groups: ParallelGroups, seed: int) -> tuple[Tensor, Tensor]:
    """This rank's T / P tokens and output gradient, drawn alike for every implementation."""
    gen = torch.Generator().manual_seed(seed + 1000 * groups.ep_rank)
    num_tokens = shape.num_tokens // groups.ep_size
    x_TD = torch.randn(num_tokens, shape.hidden_size, generator=gen).requires_grad_()
    grad_TD = torch.randn(num_tokens, shape.hidden_size, generator=gen) / num_tokens
    return x_TD, grad_TD


@dataclass(frozen=True)
class Timed:
    median_s: float
    min_s: float
    out_TD: Tensor
    """The last iteration's output (for rel_diff)."""


def time_interleaved(steps: dict[str, Callable[[], Tensor]], timing: Timing, ep_group) -> dict[str, Timed]:
    """Seconds per step after the warm-up. Round-robin over the steps: load from other processes on a shared
    machine then falls on every implementation alike. Under EP an iteration lasts until its slowest rank ends."""
    seconds = {name: [] for name in steps}
    outs: dict[str, Tensor] = {}
    for _ in range(timing.warmup + timing.iters):
        for name, step in steps.items():
            barrier(ep_group)
            start = time.perf_counter()
            outs[name] = step()
            barrier(ep_group)
            seconds[name].append(time.perf_counter() - start)
    timed = {}
    for name, seconds_all in seconds.items():
        seconds_I = torch.tensor(seconds_all[timing.warmup:], dtype=torch.float64)
        if ep_group is not None:
            dist.all_reduce(seconds_I, op=dist.ReduceOp.MAX, group=ep_group)
        timed[name] = Timed(median_s=statistics.median(seconds_I.tolist()), min_s=float(seconds_I.min()),
                            out_TD=outs[name])
    return timed


def barrier(group) -> None:
    if group is not None:
        dist.barrier(group=group)


def relative_difference(out_TD: Tensor, reference_TD: Tensor, ep_group) -> float:
    diff_2 = torch.stack([(out_TD - reference_TD).abs().max(), reference_TD.abs().max()])
    if ep_group is not None:
        dist.all_reduce(diff_2, op=dist.ReduceOp.MAX, group=ep_group)
    return float(diff_2[0] / diff_2[1])


# ---- all-to-all bytes ----

def measure_traffic(routing: Routing, groups: ParallelGroups, hidden_size: int, element_size: int) -> Traffic:
    """Bytes from the routing alone (nothing patched): rows x D x element size, summed over the EP group."""
    row_bytes = hidden_size * element_size
    num_copies = routing.expert_N.numel()
    if groups.ep_group is None:
        return Traffic(copies=0, padded=0, ideal=0, ideal_with_local=num_copies * row_bytes, dedup=0)
    placement = ExpertPlacement(routing.num_experts, groups)
    owner_N = placement.owner(routing.expert_N)
    remote_N = owner_N != groups.ep_rank
    # A (token, rank) pair counts once however many of the token's experts that rank holds.
    pairs_N = routing.token_N[remote_N] * groups.ep_size + owner_N[remote_N]
    rows_3 = torch.tensor([int(remote_N.sum()), num_copies, pairs_N.unique().numel()])
    dist.all_reduce(rows_3, group=groups.ep_group)
    capacity_E = routing.tokens_per_expert()
    dist.all_reduce(capacity_E, op=dist.ReduceOp.MAX, group=groups.ep_group)
    # DeepSpeed's dropless capacity: the largest count any rank routes to any expert; it sends
    # (E - e) x capacity rows from every rank.
    padded_rows = groups.ep_size * (routing.num_experts - placement.num_local) * int(capacity_E.max())
    remote, copies, dedup = rows_3.tolist()
    return Traffic(copies=remote * row_bytes, padded=padded_rows * row_bytes, ideal=remote * row_bytes,
                   ideal_with_local=copies * row_bytes, dedup=dedup * row_bytes)


def megamoe_dispatch_bytes(layer, x_TD: Tensor, routing: Routing, groups: ParallelGroups) -> int:
    """What megamoe's dispatcher really sends to other ranks in one dispatch, summed over the EP group."""
    if groups.ep_group is None:
        return 0
    with torch.no_grad():
        _, _, meta = layer.dispatcher.dispatch(x_TD, routing)
    rows = torch.tensor(sum(meta.send_splits) - meta.send_splits[groups.ep_rank])
    dist.all_reduce(rows, group=groups.ep_group)
    return int(rows) * x_TD.shape[1] * x_TD.element_size()


# ---- report ----

def format_table(records: list[BenchRecord]) -> str:
    """A markdown table, then which megamoe expert path was faster per configuration."""
    lines = ["| config | EP | impl | fwd+bwd ms | x floor | min ms | x floor (min) | floor ms | floor bal. ms "
             "| a2a MB | ideal a2a MB | rel diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        diff = "" if r.rel_diff is None else f"{r.rel_diff:.1e}"
        lines.append(f"| {r.config['name']} | {r.config['EP']} | {r.impl} | {1e3 * r.fwd_bwd_s:.0f} | "
                     f"{r.ratio_to_floor:.2f} | {1e3 * r.fwd_bwd_min_s:.0f} | {r.min_ratio_to_floor:.2f} | "
                     f"{1e3 * r.floor_s:.0f} | "
                     f"{1e3 * r.floor_balanced_s:.0f} | {r.a2a_bytes / 2**20:.1f} | {r.ideal_a2a_bytes / 2**20:.1f} "
                     f"| {diff} |")
    return "\n".join(lines + [""] + faster_expert_path(records))


def faster_expert_path(records: list[BenchRecord]) -> list[str]:
    by_config: dict[str, dict[str, float]] = {}
    for r in records:
        by_config.setdefault(str(r.config["name"]), {})[r.impl] = r.fwd_bwd_s
    lines = []
    for name, seconds in by_config.items():
        if {"megamoe-loop", "megamoe-grouped"} <= seconds.keys():
            loop_s, grouped_s = seconds["megamoe-loop"], seconds["megamoe-grouped"]
            faster = "loop" if loop_s <= grouped_s else "grouped"
            lines.append(f"{name}: megamoe {faster} is faster (loop {1e3 * loop_s:.1f} ms, "
                         f"grouped {1e3 * grouped_s:.1f} ms, grouped/loop {grouped_s / loop_s:.2f})")
    return lines
