"""Throughput of whole training steps, dense against MoE at equal active FFN compute, and where a step's time goes.

Each run is launched as a user launches one (`deepspeed --num_gpus <ranks> launchers/pretrain.py --config
configs/tiny-dense.yaml <overrides>`: the same engine, loop and data path), on the bundled corpus, and read back from
its metrics.jsonl: the median of train/tokens_per_s, train/tflops and train/mfu over the steps after the warm-up and
before the profiled ones, and of each part of those steps (logging.step_timers: data, forward, backward, gradient
reduction, optimizer; megamoe/train/timers.py). Its last PROFILED_STEPS steps run under the PyTorch profiler
(logging.profile_steps) on rank 0: the step's time by operator and region, and its host synchronisations
(megamoe/train/profile.py).

Sizes: `demo` is configs/tiny-dense.yaml (4 layers, d = 128, sequence 128); `small` (8 layers, d = 512, sequence
512) is large enough for GEMMs to dominate. Runs: the dense model; top-2 over 8 experts of half the dense width
and fine-grained (16 experts of 2/11 of it, top-4, plus a shared expert of 3/11: the same active width), each at
EP = 1 (DP = 2) and EP = 2 (ZeRO-2); at the demo size also the variant comparison's run of every other variant
(its overrides are sized for the demo model).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megamoe.studies.compare import StudyData, study_runs
from megamoe.train import timers

ROOT = Path(__file__).resolve().parents[2]
DEMO_FFN = 352
SIZES = {
    "demo": {"ffn": DEMO_FFN, "overrides": []},
    "small": {"ffn": 4 * DEMO_FFN, "overrides": [
        "model.hidden_size=512", "model.num_layers=8", "model.num_attention_heads=8", "model.num_query_groups=4",
        f"model.ffn_hidden_size={4 * DEMO_FFN}", "data.seq_length=512", "train.micro_batch_size=2",
        "train.global_batch_size=4"]},
}
EP2 = ["parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"]
PROFILED_STEPS = 4
PARTS = {"attention": ("attention",), "FFN / experts": ("mlp slot", "moe/experts", "moe/shared experts"),
         "router": ("moe/route", "moe/losses and statistics"), "permutation": ("moe/dispatch", "moe/combine"),
         "all-to-all": ("moe/all_to_all",), "grad. reduction": ("backward", "gradient reduction"),
         "optimizer": ("optimizer",), "embed. + output + loss": ("embedding", "output layer", "forward"),
         "data + logging": ("data", "logging")}
"""Columns of the breakdown table -> the profile's parts they sum (the rest is 'other'). 'grad. reduction' is
backward time outside the layers: DeepSpeed's gradient reduction and the waits for the other ranks in it."""
PARAMETER_PARTS = ("grad_reduction", "optimizer")
"""Timed parts that grow with the parameter count, not with the work per token: MoE at equal active compute holds
more parameters than dense (top-2 over 8 half-width experts: 4x the FFN's)."""


def runs(size: str) -> dict[str, list[str]]:
    """name -> overrides of the dense run."""
    ffn = SIZES[size]["ffn"]
    top2 = ["moe.num_experts=8", "moe.router_topk=2", f"moe.ffn_hidden_size={ffn // 2}"]
    fine = ["moe.num_experts=16", "moe.router_topk=4", f"moe.ffn_hidden_size={ffn * 2 // 11}",
            f"moe.shared_expert_intermediate_size={ffn * 3 // 11}"]
    named = {"dense": [], "top2 EP=1": top2, "top2 EP=2": [*top2, *EP2], "fine-grained EP=1": fine,
             "fine-grained EP=2": [*fine, *EP2]}
    if size == "demo":
        named |= other_variants()
    return named


def other_variants() -> dict[str, list[str]]:
    """The variant comparison's first causal run of every variant but the top-k family (sized for the demo)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for name, (variant, overrides) in study_runs().items():
        own_layer = any(o.startswith("moe.variant=") for o in overrides)
        if variant and own_layer and "model.objective=masked_lm" not in overrides and variant not in found:
            found[variant] = (name, overrides)
    return {f"{name} EP=1": overrides for name, overrides in found.values()}


@dataclass
class TrainThroughput:
    size: str
    run: str
    tokens_per_s: float
    tflops: float
    mfu: float
    step_s: float
    vs_dense: float = 0.0
    """tokens/s over the dense run's of the same size (measured in the same invocation)."""
    timers_ms: dict = field(default_factory=dict)
    """Medians of rank 0's time/<part>_ms over the measured (unprofiled) steps (megamoe/train/timers.py)."""
    profile: dict = field(default_factory=dict)
    """Rank 0's breakdown of its profiled steps (megamoe/train/profile.py)."""


def measure(size: str, run: str, overrides: list[str], data: StudyData, out: Path, steps: int,
            warmup: int) -> TrainThroughput:
    """Launch one run on 2 processes and take the medians of its logged steps after `warmup`."""
    log_dir = out / size / run.replace(" ", "_").replace("=", "")
    profiled = [steps - PROFILED_STEPS + 1, steps]
    records = launch_run(f"the {size} {run} run", log_dir, data, steps, [
        f"logging.profile_steps=[{profiled[0]},{profiled[1]}]", "logging.step_timers=true", "checkpoint.save=null",
        *SIZES[size]["overrides"], *overrides])
    kept = [r for r in records if "train/tokens_per_s" in r and warmup < r["step"] < profiled[0]]

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in kept)

    profile = json.loads((log_dir / "profile" / "rank0.breakdown.json").read_text())
    return TrainThroughput(size=size, run=run, tokens_per_s=median("train/tokens_per_s"),
                           tflops=median("train/tflops"), mfu=median("train/mfu"), step_s=median("train/step_s"),
                           timers_ms={part: median(f"time/{part}_ms") for part in timers.REPORTED}, profile=profile)


def launch_run(what: str, log_dir: Path, data: StudyData, steps: int, overrides: list[str]) -> list[dict]:
    """Launch `steps` training steps on 2 processes as a user does (configs/tiny-dense.yaml, the study corpus,
    `overrides` last) logging every step into `log_dir`; returns its metrics.jsonl records. RuntimeError naming
    `what` if it fails."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    command = [launcher, "--num_gpus", "2", str(ROOT / "launchers" / "pretrain.py"), "--config",
               str(ROOT / "configs" / "tiny-dense.yaml"), *data.overrides(), "data.split=99,1,0",
               f"train.train_iters={steps}", f"train.lr_warmup_iters={min(30, steps - 1)}", "train.log_interval=1",
               "train.eval_iters=0", "logging.wandb=false", "logging.tensorboard=false", f"logging.log_dir={log_dir}",
               *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {last} (its console.log, if it got that far: "
                           f"{log_dir})")
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def relative_to_dense(results: list[TrainThroughput]) -> list[TrainThroughput]:
    """Each result's tokens/s over the dense run's of its size."""
    dense = {r.size: r.tokens_per_s for r in results if r.run == "dense"}
    for r in results:
        r.vs_dense = r.tokens_per_s / dense[r.size] if r.size in dense else float("nan")
    return results


def table(results: list[TrainThroughput]) -> str:
    lines = ["| size | run | tokens/s | vs dense | step s | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.size} | {r.run} | {r.tokens_per_s:,.0f} | {r.vs_dense:.2f} | {r.step_s:.3f} | {r.tflops:.3f} | "
              f"{100 * r.mfu:.1f} % |" for r in results]
    return "\n".join(lines)


def timers_table(results: list[TrainThroughput]) -> str:
    """Each run's unprofiled step by timed part (medians, ms), and for MoE runs a ceiling: the run's ratio to dense
    if everything but its parameter parts took dense's time, i.e. if its MoE layers were exactly as fast as the dense
    MLP. Its gradients' reduction and optimizer step alone hold it there, however fast the layer. (ZeRO-2 reduces
    gradient buckets during the backward too: that share stays in 'backward', so its ceiling is an upper bound.)"""
    dense = {r.size: r for r in results if r.run == "dense" and r.timers_ms}
    names = [p.replace("_", " ") for p in timers.REPORTED]
    lines = ["| size | run | step ms | " + " | ".join(names) + " | ceiling |", "|---|---|---|" + "---|" * len(names)
             + "---|"]
    for r in results:
        if not r.timers_ms:
            continue
        base = dense.get(r.size)
        ceiling = "" if r.run == "dense" or base is None else f"{ceiling_vs_dense(r, base):.2f}"
        lines.append(f"| {r.size} | {r.run} | {1e3 * r.step_s:.1f} | "
                     + " | ".join(f"{r.timers_ms[p]:.1f}" for p in timers.REPORTED) + f" | {ceiling} |")
    return "\n".join(lines)


def ceiling_vs_dense(run: TrainThroughput, dense: TrainThroughput) -> float:
    """dense step / (dense step + the run's extra time in the parameter parts)."""
    extra_ms = sum(run.timers_ms[p] - dense.timers_ms[p] for p in PARAMETER_PARTS)
    dense_ms = 1e3 * dense.step_s
    return dense_ms / (dense_ms + max(extra_ms, 0.0))


def part_ms(profile: dict) -> dict[str, float]:
    """Milliseconds per step of each PARTS column, and 'other'."""
    by_part = {row["part"]: row["total"] for row in profile["parts_ms"]}
    columns = {column: sum(by_part.pop(p, 0.0) for p in parts) for column, parts in PARTS.items()}
    return {**columns, "other": sum(by_part.values())}


def breakdown_table(results: list[TrainThroughput]) -> str:
    """Where rank 0's step time goes, in ms per step under the profiler, and its host syncs per step."""
    header = ["size", "run", "step ms", *PARTS, "other", "host syncs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        if not r.profile:
            continue
        ms = part_ms(r.profile)
        lines.append(f"| {r.size} | {r.run} | {r.profile['step_ms']:.1f} | "
                     + " | ".join(f"{ms[c]:.1f}" for c in [*PARTS, "other"])
                     + f" | {r.profile['host_syncs_per_step']:g} |")
    return "\n".join(lines)
