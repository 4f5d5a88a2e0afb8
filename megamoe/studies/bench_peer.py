"""Forward+backward time and peak memory of one PEER layer (arXiv:2407.04153) as N grows: megamoe's PEERMoE
against lucidrains' PEER-pytorch (`PEER_pytorch.PEER`) at the same configuration.

Each (N, implementation) runs in a fresh spawned process, so its peak RSS is its own and no allocator cache or
page-fault history carries over from the previous case. Both implementations get the same input x and output
gradient; their weights are their own (different initialisations, so outputs are not compared). A case that
fails (PEER-pytorch out of memory, the package missing, the process killed) becomes a record with `error`.

Memory: `model_rss_gb` is the process RSS after building the layer and its inputs; `peak_rss_gb` is
getrusage's ru_maxrss at the end. Linux carries the pre-exec high-water mark across execve, and Python spawns
by vfork + exec, so a child's ru_maxrss starts at the parent's peak: the parent here imports torch and builds
nothing. `peak_hwm_gb` (VmHWM of the child's own address space) cross-checks it.

Allocator: every backward allocates fresh [N, d] table gradients (as training does: ZeRO frees them after each
reduction). On a GPU the caching allocator hands the same blocks back; glibc instead returns such blocks to the
OS on free, and the next backward page-faults 2 GB of new pages at N = 1024^2, which made the timings of that
case vary by 2-4x from run to run. The cases therefore run with glibc's mmap and trim thresholds raised
(GLIBC_REUSE: freed blocks stay in the process for reuse, like a caching allocator), for both implementations,
unless the caller set those variables.

Shapes: T tokens, D hidden, N experts, I timed iterations.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megamoe.config import ModelConfig
from megamoe.moe import LayerShape, build_moe
from megamoe.parallel.groups import ParallelGroups
from megamoe.train.flops import cpu_gemm_tflops, memory_bandwidth_gbs
from megamoe.utils import GLIBC_REUSE
from megamoe.variants.peer import PEERMoEConfig, peer_ffn_madds

IMPLS = ("megamoe", "peer-pytorch")
SCALING_TARGET = 2.0
"""Acceptance: megamoe's per-token time at the largest N (1024^2) at most this multiple of the smallest (128^2)."""
PEER_PYTORCH_DIFFERENCES = (
    "keys: PEER-pytorch has one pair of sub-key tables per head [h, sqrt(N), 2, d_k/2], init N(0, 0.02^2); "
    "megamoe shares one pair across heads (Eq. 7), init U(+-1/sqrt(d_k/2))",
    "query norm: none in PEER-pytorch (its issue #1); megamoe applies BatchNorm1d to the h*d_k query features",
    "tables: PEER-pytorch uses nn.Embedding, init N(0, 1), whose backward builds dense [N, d] gradients; "
    "megamoe: N(0, 1/d), gradients index_add_-ed into one [N, d] buffer per table",
    "PEER-pytorch's dim_key is the sub-key width (queries have 2*h*dim_key features): dim_key = d_k/2 here",
    "PEER-pytorch is built with non_competing_scores=False: its default (True) keeps 1 expert per head with "
    "ReLU scores; False gives softmax over each head's k experts (Alg. 1), as megamoe",
    "PEER-pytorch gathers the [T, h, k, d] down and up rows at once and keeps them for backward; megamoe "
    "keeps only the [T, h*k] pre-activations, takes the copies' dot products with their rows as a sampled "
    "dense-dense product on a CPU (gathers in chunks of chunk_tokens elsewhere) and forms the table gradients "
    "chunk by chunk",
    "sub-key gradients: PEER-pytorch's autograd through topk forms dense [T, h, sqrt(N)] score gradients; "
    "megamoe's backward touches only the chosen sub-keys",
)


@dataclass(kw_only=True, frozen=True)
class PEERBenchConfig:
    """One PEER layer to time; N comes from the list of sides (N = side^2)."""

    num_tokens: int = 4096
    hidden_size: int = 256
    num_heads: int = 8
    topk_per_head: int = 16
    key_dim: int = 128
    """d_k, megamoe's meaning: the query width per head (two halves of d_k/2)."""
    chunk_tokens: int = 512
    """megamoe's tokens per expert chunk (PEER-pytorch has no such knob)."""
    warmup: int = 1
    """Untimed iterations first (allocator, thread pools, first touch of the tables)."""
    iters: int = 3
    """Timed iterations; records hold their median."""
    threads: int | None = None
    """torch threads in each case's process. None: OMP_NUM_THREADS, else every core this process may use."""
    seed: int = 1234


@dataclass(kw_only=True)
class PEERRecord:
    """One (N, implementation). Timing and memory fields are None when the case failed (see `error`)."""

    impl: str
    N: int
    T: int
    d: int
    heads: int
    k: int
    d_k: int
    fwd_bwd_s: float | None = None
    """Median seconds of one forward + backward (gradients of x and every parameter)."""
    fwd_bwd_min_s: float | None = None
    """Fastest timed iteration: the least disturbed by other processes on a shared machine."""
    per_token_us: float | None = None
    """fwd_bwd_s / T in microseconds."""
    model_rss_gb: float | None = None
    """RSS after building the layer and its inputs (GB = 1e9 bytes)."""
    peak_rss_gb: float | None = None
    """ru_maxrss at the end of the case."""
    working_rss_gb: float | None = None
    """peak_rss_gb - model_rss_gb: activations, gradients and allocator slack."""
    peak_hwm_gb: float | None = None
    """VmHWM of the case's process (Linux): its own peak, whatever the parent held."""
    num_params: int | None = None
    build_s: float | None = None
    """Seconds to import the implementation (PEER-pytorch) and build the layer and inputs."""
    threads: int | None = None
    thp: bool | None = None
    """THP_MEM_ALLOC_ENABLE=1 was set: PyTorch's CPU allocator used transparent huge pages."""
    error: str | None = None
    scaling_vs_smallest_N: float | None = None
    """per_token_us / this implementation's per_token_us at the smallest N it completed."""
    megamoe_over_peer_pytorch_time: float | None = None
    """At this N (same value on both implementations' records)."""
    megamoe_over_peer_pytorch_memory: float | None = None
    """Peak RSS ratio at this N."""
    megamoe_over_peer_pytorch_working_memory: float | None = None
    flop_floor_s: float | None = None
    """peer_flops at the GEMM peak measured on this machine for the case's threads (megamoe/train/flops.py)."""
    memory_floor_s: float | None = None
    """peer_bytes at this machine's measured memory bandwidth (a large copy, timed once and cached)."""
    over_floor: float | None = None
    """fwd_bwd_s / the larger of the two floors (megamoe's records)."""
    timing: dict[str, int] = field(default_factory=dict)


def validate_peer_bench(sides: list[int], impls: list[str], cfg: PEERBenchConfig) -> None:
    """Command-line mistakes, before any process starts."""
    if unknown := sorted(set(impls) - set(IMPLS)):
        raise ValueError(f"implementation {unknown[0]!r} is unknown; choose from {list(IMPLS)}")
    if too_small := [s for s in sides if s < cfg.topk_per_head]:
        raise ValueError(f"--sides {too_small[0]} gives sqrt(N) < k={cfg.topk_per_head}: product-key retrieval "
                         f"needs k <= sqrt(N); use sides >= {cfg.topk_per_head}")
    if cfg.key_dim % 2 or cfg.hidden_size % 2:
        raise ValueError(f"--key-dim {cfg.key_dim} and --dim {cfg.hidden_size} must be even (two key halves; "
                         "PEER-pytorch asserts an even dim)")
    if cfg.iters < 1 or cfg.warmup < 0:
        raise ValueError(f"--iters {cfg.iters} must be >= 1 and --warmup {cfg.warmup} >= 0")


def run(sides: list[int], impls: list[str], cfg: PEERBenchConfig | None = None) -> list[PEERRecord]:
    """One record per (side, implementation), each measured in its own process, then the ratios."""
    cfg = cfg or PEERBenchConfig()
    validate_peer_bench(sides, impls, cfg)
    for name, value in GLIBC_REUSE.items():  # the spawned cases inherit the environment
        os.environ.setdefault(name, value)
    records = [measure_in_subprocess(impl, side * side, cfg) for side in sorted(sides) for impl in impls]
    add_ratios(records)
    return records


def measure_in_subprocess(impl: str, num_experts: int, cfg: PEERBenchConfig) -> PEERRecord:
    """`measure` in a fresh spawned process; a process that dies (e.g. the OOM killer) gives an error record."""
    ctx = multiprocessing.get_context("spawn")  # fork would share the parent's pages and its peak RSS
    recv_conn, send_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_case_main, args=(send_conn, impl, num_experts, cfg), daemon=True)
    process.start()
    send_conn.close()  # else recv below would wait forever for a dead child
    try:
        record = recv_conn.recv()
    except EOFError:
        record = None
    process.join()
    if record is None:
        code = process.exitcode
        why = f"killed by signal {-code} (out of memory?)" if code is not None and code < 0 else f"exit code {code}"
        record = _empty_record(impl, num_experts, cfg, error=f"case process died: {why}")
    return record


def _case_main(conn, impl: str, num_experts: int, cfg: PEERBenchConfig) -> None:
    try:
        record = measure(impl, num_experts, cfg)
    except Exception as err:  # out of memory, a missing package: report it and go on with the other cases
        record = _empty_record(impl, num_experts, cfg, error=f"{type(err).__name__}: {str(err)[:300]}")
    conn.send(record)
    conn.close()


def _empty_record(impl: str, num_experts: int, cfg: PEERBenchConfig, **extra) -> PEERRecord:
    return PEERRecord(impl=impl, N=num_experts, T=cfg.num_tokens, d=cfg.hidden_size, heads=cfg.num_heads,
                      k=cfg.topk_per_head, d_k=cfg.key_dim, timing={"warmup": cfg.warmup, "iters": cfg.iters},
                      **extra)


def measure(impl: str, num_experts: int, cfg: PEERBenchConfig) -> PEERRecord:
    """Time and memory of one case in this process (meant to be a fresh one: see measure_in_subprocess)."""
    torch.set_num_threads(cfg.threads or default_threads())
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    layer, forward = BUILDERS[impl](num_experts, cfg)
    x_TD, grad_TD = bench_inputs(cfg)
    build_s = time.perf_counter() - start
    model_bytes = current_rss_bytes()
    seconds_I = time_fwd_bwd(layer, forward, x_TD, grad_TD, cfg)
    peak_bytes, hwm_bytes = peak_rss_bytes(), own_peak_bytes()
    median_s = statistics.median(seconds_I)
    floors = floors_s(num_experts, cfg) if impl == "megamoe" else {}
    return _empty_record(
        impl, num_experts, cfg, fwd_bwd_s=median_s, fwd_bwd_min_s=min(seconds_I),
        per_token_us=1e6 * median_s / cfg.num_tokens, model_rss_gb=model_bytes / 1e9,
        peak_rss_gb=peak_bytes / 1e9, working_rss_gb=(peak_bytes - model_bytes) / 1e9,
        peak_hwm_gb=None if hwm_bytes is None else hwm_bytes / 1e9,
        num_params=sum(p.numel() for p in layer.parameters()), build_s=build_s, threads=torch.get_num_threads(),
        thp=os.environ.get("THP_MEM_ALLOC_ENABLE") == "1", **floors,
        **({"over_floor": median_s / max(floors.values())} if floors else {}))


def peer_config(num_experts: int, cfg: PEERBenchConfig) -> PEERMoEConfig:
    return PEERMoEConfig(num_experts=num_experts, num_heads=cfg.num_heads, topk_per_head=cfg.topk_per_head,
                         key_dim=cfg.key_dim, chunk_tokens=cfg.chunk_tokens)  # query_norm="batchnorm"


def peer_flops(num_experts: int, cfg: PEERBenchConfig) -> float:
    """FLOPs of one forward + backward that any implementation must do: the layer's multiply-adds per token as the
    FLOP ledger counts them (query projection, both sub-key score products of every head, each token's h*k experts:
    a dot product with the down row and an axpy with the up row), 2 FLOPs each, backward = 2x forward. The top-k
    selections and the k^2 candidate sums are not GEMM work and are left out."""
    model = ModelConfig(num_layers=1, hidden_size=cfg.hidden_size, num_attention_heads=1)
    return 2.0 * 3 * cfg.num_tokens * peer_ffn_madds(peer_config(num_experts, cfg), model)


def peer_bytes(num_experts: int, cfg: PEERBenchConfig) -> float:
    """Bytes one forward + backward must move through memory: each of the T*h*k copies gathers its down and up
    rows in the forward and again in the backward, and scatter-adds into both gradient tables (read and write);
    the two [N, D] gradient tables are written once (dense gradients, as DeepSpeed reduces them). fp32."""
    row = cfg.hidden_size * 4
    copies = cfg.num_tokens * cfg.num_heads * cfg.topk_per_head
    return copies * row * 2 * (1 + 1 + 2) + 2 * num_experts * row


def floors_s(num_experts: int, cfg: PEERBenchConfig) -> dict[str, float]:
    """The case's FLOP floor and memory-traffic floor, in seconds, on this machine."""
    return {"flop_floor_s": peer_flops(num_experts, cfg) / (cpu_gemm_tflops() * 1e12),
            "memory_floor_s": peer_bytes(num_experts, cfg) / (memory_bandwidth_gbs() * 1e9)}


def default_threads() -> int:
    # One case runs at a time, so it may use every core; an explicit OMP_NUM_THREADS wins.
    if "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0))


def bench_inputs(cfg: PEERBenchConfig) -> tuple[Tensor, Tensor]:
    """x and the output gradient, drawn from the seed alone: identical for every implementation and N."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x_TD = torch.randn(cfg.num_tokens, cfg.hidden_size, generator=gen).requires_grad_()
    grad_TD = torch.randn(cfg.num_tokens, cfg.hidden_size, generator=gen) / cfg.num_tokens
    return x_TD, grad_TD


def time_fwd_bwd(layer: torch.nn.Module, forward: Callable[[Tensor], Tensor], x_TD: Tensor, grad_TD: Tensor,
                 cfg: PEERBenchConfig) -> list[float]:
    """Seconds of each timed forward + backward. Gradients are dropped before each iteration (untimed), as
    zero_grad(set_to_none=True) does in training: every backward allocates fresh [N, d] table gradients."""
    seconds = []
    for _ in range(cfg.warmup + cfg.iters):
        layer.zero_grad(set_to_none=True)
        x_TD.grad = None
        start = time.perf_counter()
        forward(x_TD).backward(grad_TD)
        seconds.append(time.perf_counter() - start)
    return seconds[cfg.warmup:]


# ---- the two implementations: (module, x_TD -> y_TD) ----

def build_megamoe(num_experts: int, cfg: PEERBenchConfig) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor]]:
    moe_cfg = peer_config(num_experts, cfg)
    shape = LayerShape(hidden_size=cfg.hidden_size, ffn_hidden_size=4 * cfg.hidden_size, swiglu=True,
                       init_std=0.02, num_layers=8, layer_number=4, seed=cfg.seed)
    layer = build_moe(moe_cfg, shape, ParallelGroups.single_process())
    return layer, layer


def build_peer_pytorch(num_experts: int,
                       cfg: PEERBenchConfig) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor]]:
    """PEER_pytorch.PEER at the same h, k, d_k (see PEER_PYTORCH_DIFFERENCES); x as one sequence [1, T, D]."""
    from PEER_pytorch import PEER  # optional benchmark dependency: pip install megamoe[bench]

    layer = PEER(cfg.hidden_size, heads=cfg.num_heads, num_experts=num_experts,
                 num_experts_per_head=cfg.topk_per_head, dim_key=cfg.key_dim // 2, non_competing_scores=False)

    def forward(x_TD: Tensor) -> Tensor:
        return layer(x_TD[None]).squeeze(0)

    return layer, forward


BUILDERS: dict[str, Callable[[int, PEERBenchConfig], tuple[torch.nn.Module, Callable[[Tensor], Tensor]]]] = {
    "megamoe": build_megamoe, "peer-pytorch": build_peer_pytorch}


# ---- memory ----

def current_rss_bytes() -> int:
    """Resident set size now (/proc/self/statm); off Linux, the peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if os.uname().sysname == "Darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def own_peak_bytes() -> int | None:
    """VmHWM: the peak RSS of this address space (reset by exec, unlike ru_maxrss); None off Linux."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


# ---- ratios and report ----

def add_ratios(records: list[PEERRecord]) -> None:
    """Fill scaling_vs_smallest_N per implementation and the megamoe / PEER-pytorch ratios per N."""
    done = [r for r in records if r.error is None]
    for impl in {r.impl for r in done}:
        mine = sorted((r for r in done if r.impl == impl), key=lambda r: r.N)
        for r in mine:
            r.scaling_vs_smallest_N = r.per_token_us / mine[0].per_token_us
    by_n = {(r.N, r.impl): r for r in done}
    for r in records:
        ours, theirs = by_n.get((r.N, "megamoe")), by_n.get((r.N, "peer-pytorch"))
        if ours is None or theirs is None:
            continue
        r.megamoe_over_peer_pytorch_time = ours.fwd_bwd_s / theirs.fwd_bwd_s
        r.megamoe_over_peer_pytorch_memory = ours.peak_rss_gb / theirs.peak_rss_gb
        r.megamoe_over_peer_pytorch_working_memory = ours.working_rss_gb / theirs.working_rss_gb


def format_table(records: list[PEERRecord]) -> str:
    """Markdown: one row per case, the megamoe / PEER-pytorch ratios per N, the scaling verdict, the notes."""
    lines = ["| N | impl | fwd+bwd s | min s | us/token | x smallest N | model GB | peak GB | working GB | "
             "threads | FLOP floor s | memory floor s | x floor | note |", "|" + "---|" * 14]
    lines += [table_row(r) for r in records]
    notes = ["PEER-pytorch differs from megamoe's PEER:"] + [f"- {d}" for d in PEER_PYTORCH_DIFFERENCES]
    sections = [lines, ratio_table(records), scaling_verdict(records), notes]
    return "\n\n".join("\n".join(section) for section in sections if section)


def table_row(r: PEERRecord) -> str:
    if r.error is not None:
        error = r.error.replace("|", "/").replace("\n", " ")  # a stray pipe would split the row
        return f"| {side_label(r.N)} | {r.impl} |" + " |" * 11 + f" failed: {error} |"
    floors = (f"{r.flop_floor_s:.3f} | {r.memory_floor_s:.3f} | {r.over_floor:.2f}" if r.over_floor is not None
              else " |  | ")
    return (f"| {side_label(r.N)} | {r.impl} | {r.fwd_bwd_s:.3f} | {r.fwd_bwd_min_s:.3f} | {r.per_token_us:.1f} | "
            f"{r.scaling_vs_smallest_N:.2f} | {r.model_rss_gb:.2f} | {r.peak_rss_gb:.2f} | {r.working_rss_gb:.2f} | "
            f"{r.threads} | {floors} | {'' if r.thp else 'no THP'} |")


def ratio_table(records: list[PEERRecord]) -> list[str]:
    rows = {r.N: r for r in records if r.impl == "megamoe" and r.megamoe_over_peer_pytorch_time is not None}
    if not rows:
        return ["(no N with both implementations measured: no megamoe / PEER-pytorch ratios)"]
    lines = ["| N | time megamoe / PEER-pytorch | peak memory megamoe / PEER-pytorch | working memory |",
             "|---|---|---|---|"]
    lines += [f"| {side_label(n)} | {r.megamoe_over_peer_pytorch_time:.2f} | "
              f"{r.megamoe_over_peer_pytorch_memory:.2f} | {r.megamoe_over_peer_pytorch_working_memory:.2f} |"
              for n, r in rows.items()]
    return lines


def scaling_verdict(records: list[PEERRecord]) -> list[str]:
    """Per implementation: per-token time at its largest N over its smallest (the target applies to megamoe)."""
    lines = []
    for impl in dict.fromkeys(r.impl for r in records):
        done = sorted((r for r in records if r.impl == impl and r.error is None), key=lambda r: r.N)
        if len(done) < 2:
            continue
        ratio = done[-1].scaling_vs_smallest_N
        verdict = f" (target <= {SCALING_TARGET:g}x: {'met' if ratio <= SCALING_TARGET else 'NOT met'})"
        lines.append(f"{impl}: per-token time at N={side_label(done[-1].N)} is {ratio:.2f}x that at "
                     f"N={side_label(done[0].N)}" + (verdict if impl == "megamoe" else ""))
    return lines


def side_label(num_experts: int) -> str:
    return f"{math.isqrt(num_experts)}^2"

