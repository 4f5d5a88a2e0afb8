"""Where a training step's time goes: the PyTorch profiler over chosen steps, summed by part of the step.

`logging.profile_steps: [first, last]` profiles those optimizer steps (1-based, inclusive) on the ranks of
`logging.profile_ranks` and writes, per profiled rank, log_dir/profile/rank<r>.trace.json (open it in Perfetto or
chrome://tracing) and log_dir/profile/rank<r>.breakdown.json; rank 0 logs the breakdown.

How time is attributed. The code marks the parts of a step with regions named `megamoe/<part>`
(torch.profiler.record_function): the loop marks data, forward, backward, optimizer and logging; the MoE layer its
routing, permutation, all-to-all, experts, combine and losses; hooks added while profiling mark each layer's
attention, MLP slot, the embedding and the output layer. An operator's own time goes to its innermost region. A
backward operator belongs to the region of the forward operator that created it (autograd's sequence number), so
"attention" is its forward plus its backward. Collectives outside the MoE all-to-all are their own parts (gradient
reduction in backward and the optimizer step; other collectives elsewhere).

Host synchronisations: operators that must read a device value on the host before the next launch (SYNC_OPS:
.item(), bool(), nonzero and boolean-mask indexing), counted per step with the region they happen in, and the reads
megamoe's MoE layers make through megamoe.moe.host.read_on_host, by reason. On a CPU they cost nothing extra; on a
GPU each one drains the launch queue.

The breakdown sums CPU-side operator time (on a GPU the kernels are in the trace, not in the sums).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

from megamoe.config import RunConfig
from megamoe.moe import host
from megamoe.profiling import PREFIX, region
from megamoe.utils import get_logger

MODULE_REGIONS = {"self_attention": "attention", "mlp": "mlp slot", "embedding": "embedding",
                  "output_layer": "output layer"}
"""Submodules (by the last component of their name) marked while profiling, and their part."""
SYNC_OPS = {"aten::_local_scalar_dense": "value read on the host", "aten::is_nonzero": "value read on the host",
            "aten::nonzero": "data-dependent shape"}
"""Operators that read a device value on the host. Tensor.tolist() reads a CPU tensor without any operator, so
on a CPU the profiler cannot see it: megamoe's own reads go through megamoe.moe.host.read_on_host, which counts
them; a library's tolist() on a CPU goes uncounted."""
COLLECTIVE_WORDS = ("allreduce", "all_reduce", "reduce_scatter", "allgather", "all_gather", "broadcast", "barrier",
                    "alltoall", "all_to_all", "send", "recv")
BACKWARD = "autograd::engine::evaluate_function"
GRADIENT_REGIONS = {"backward", "optimizer"}
TOP_OPS = 8
"""Operators listed per part (by their own time) in the breakdown file."""


class StepProfiler:
    """Profiles the steps of logging.profile_steps on this rank, if it is one of logging.profile_ranks."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, rank: int) -> None:
        steps = cfg.logging.profile_steps
        self.first, self.last = steps if steps else (0, -1)
        self.enabled = bool(steps) and rank in cfg.logging.profile_ranks
        self.model, self.rank, self.out = model, rank, Path(cfg.logging.log_dir) / "profile"
        self._profiler, self._hooks, self._wall_s, self._reads = None, [], 0.0, Counter()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wrap optimizer step `step` (1-based), its logging included."""
        if not self.enabled or not self.first <= step <= self.last:
            yield
            return
        if step == self.first:
            self._start()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._wall_s += time.perf_counter() - start
            if step == self.last:
                self._stop()

    def _start(self) -> None:
        self._hooks = mark_modules(self.model)
        self._reads = Counter(host.READS)
        self._profiler = torch.profiler.profile(activities=_activities())
        self._profiler.__enter__()

    def _stop(self) -> None:
        self._profiler.__exit__(None, None, None)
        for hook in self._hooks:
            hook.remove()
        steps = self.last - self.first + 1
        result = {"rank": self.rank, "steps": [self.first, self.last], "step_ms": 1e3 * self._wall_s / steps,
                  **breakdown(self._profiler.events(), steps, host.READS - self._reads)}
        self.out.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(self.out / f"rank{self.rank}.trace.json"))
        (self.out / f"rank{self.rank}.breakdown.json").write_text(json.dumps(result, indent=1))
        if self.rank == 0:
            get_logger().info(describe(result))
        self._profiler = None


def _activities() -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]


def mark_modules(model: torch.nn.Module) -> list:
    """Forward hooks that open a region around each attention, MLP slot, embedding and output layer."""
    hooks = []
    for name, module in model.named_modules():
        part = MODULE_REGIONS.get(name.rsplit(".", 1)[-1])
        if part is None:
            continue
        opened = []

        def enter(_module, _args, part=part, opened=opened):
            opened.append(region(part).__enter__())

        def leave(_module, _args, _output, opened=opened):
            opened.pop().__exit__(None, None, None)

        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return hooks


def breakdown(events, steps: int, door_reads: Counter | None = None) -> dict:
    """Per part of the step: milliseconds per step in forward, backward and outside both; host syncs per step (the
    profiled operators', and `door_reads`: megamoe's reads through read_on_host, by reason)."""
    time_us: dict[tuple[str, str], float] = defaultdict(float)
    syncs: Counter = Counter()
    op_us: dict[str, Counter] = defaultdict(Counter)
    part_of_sequence: dict[int, str] = {}

    def visit(event, part: str, phase: str, in_sync: bool) -> None:
        name = event.name
        if name.startswith(PREFIX):
            part = name[len(PREFIX):]
            phase = {"forward": "forward", "backward": "backward"}.get(part, phase)
        if name.startswith(BACKWARD):
            part, phase = part_of_sequence.get(event.sequence_nr, part), "backward"
        elif phase == "forward" and event.sequence_nr >= 0:
            # Operators record the number the next autograd node will get, whether or not they create it: the
            # last one before the number moves on is the node's creator.
            part_of_sequence[event.sequence_nr] = part
        own = part
        if part != "moe/all_to_all" and any(word in name.lower() for word in COLLECTIVE_WORDS):
            own = "gradient reduction" if part in GRADIENT_REGIONS or phase == "backward" else "other collectives"
        time_us[(own, phase)] += event.self_cpu_time_total
        op_us[own][name] += event.self_cpu_time_total
        if name in SYNC_OPS and not in_sync and part != "data":  # the data part reads host tensors only
            syncs[(part, phase, _caller(event))] += 1
        for child in event.cpu_children:
            visit(child, part, phase, in_sync or name in SYNC_OPS)

    roots = sorted((e for e in events if e.cpu_parent is None), key=lambda e: e.time_range.start)
    for root in roots:  # in time order: a forward operator is seen before the backward one it created
        visit(root, "unmarked", "other", False)
    parts: dict[str, dict[str, float]] = defaultdict(lambda: {"forward": 0.0, "backward": 0.0, "other": 0.0})
    for (part, phase), us in time_us.items():
        parts[part][phase] += us / 1e3 / steps
    rows = sorted(({"part": p, **{k: round(v, 3) for k, v in ms.items()}, "total": round(sum(ms.values()), 3),
                    "top_ops_ms": {op: round(us / 1e3 / steps, 3) for op, us in op_us[p].most_common(TOP_OPS)}}
                   for p, ms in parts.items()), key=lambda row: -row["total"])
    sync_rows = [{"where": "MoE layers", "op": f"read_on_host: {why}", "per_step": count / steps}
                 for why, count in (door_reads or Counter()).most_common()]
    sync_rows += [{"where": f"{part} ({phase})", "op": op, "per_step": count / steps}
                  for (part, phase, op), count in syncs.most_common()]
    return {"parts_ms": rows, "host_syncs_per_step": sum(r["per_step"] for r in sync_rows), "host_syncs": sync_rows}


def _caller(event) -> str:
    """A sync operator and what called it: its nearest ancestor that is not an aten operator."""
    caller = event.cpu_parent
    while caller is not None and caller.name.startswith("aten::"):
        caller = caller.cpu_parent
    return f"{event.name} under {caller.name}" if caller is not None else event.name


def describe(result: dict) -> str:
    """The breakdown as console lines."""
    total = sum(row["total"] for row in result["parts_ms"]) or 1.0
    lines = [f"profile of steps {result['steps'][0]}-{result['steps'][1]} on rank {result['rank']}: "
             f"{result['step_ms']:.1f} ms per step under the profiler; operator time by part (forward/backward):"]
    lines += [f"  {row['part']:<22} {row['total']:8.2f} ms {100 * row['total'] / total:5.1f} %  "
              f"({row['forward']:.2f}/{row['backward']:.2f})" for row in result["parts_ms"]]
    lines.append(f"  host syncs per step: {result['host_syncs_per_step']:g}")
    lines += [f"    {row['per_step']:g} x {row['op']} in {row['where']}" for row in result["host_syncs"]]
    return "\n".join(lines)
