"""Throughput of whole training steps, dense against MoE at equal active FFN compute.

Each run is launched as a user launches one (`deepspeed --num_gpus <ranks> launchers/pretrain.py --config
configs/tiny-dense.yaml <overrides>`: the same engine, loop and data path), on the bundled corpus, and read back from
its metrics.jsonl: the median of train/tokens_per_s, train/tflops and train/mfu over the steps after the warm-up.
Sizes: `demo` is configs/tiny-dense.yaml (4 layers, d = 128, sequence 128); `small` (8 layers, d = 512, sequence
512) is large enough for GEMMs to dominate. The MoE runs replace every dense FFN of width F by 8 experts of width
F / 2 with top-2 routing (the same active FFN multiply-adds plus the router), at EP = 1 (DP = 2) and EP = 2.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIZES = {
    "demo": {"ffn": 352, "overrides": []},
    "small": {"ffn": 1408, "overrides": ["model.hidden_size=512", "model.num_layers=8", "model.num_attention_heads=8",
                                         "model.num_query_groups=4", "model.ffn_hidden_size=1408",
                                         "data.seq_length=512", "train.micro_batch_size=2",
                                         "train.global_batch_size=4"]},
}


def runs(ffn: int) -> dict[str, list[str]]:
    """name -> overrides of the dense run: the dense model, and top-2 over 8 experts of half its width."""
    top2 = ["moe.num_experts=8", "moe.router_topk=2", f"moe.ffn_hidden_size={ffn // 2}"]
    return {"dense": [], "top2 EP=1": top2,
            "top2 EP=2": [*top2, "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"]}


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


def measure(size: str, run: str, overrides: list[str], data: tuple[str, str], out: Path, steps: int,
            warmup: int) -> TrainThroughput:
    """Launch one run on 2 processes and take the medians of its logged steps after `warmup`."""
    prefix, tokenizer = data
    log_dir = out / size / run.replace(" ", "_").replace("=", "")
    launcher = str(Path(sys.executable).parent / "deepspeed")
    command = [launcher, "--num_gpus", "2", str(ROOT / "launchers" / "pretrain.py"), "--config",
               str(ROOT / "configs" / "tiny-dense.yaml"), f"data.data_path=[{prefix}]",
               f"data.tokenizer_model={tokenizer}", "data.split=99,1,0", f"train.train_iters={steps}",
               f"train.lr_warmup_iters={min(30, steps - 1)}", "train.log_interval=1", "train.eval_iters=0",
               "logging.wandb=false", "logging.tensorboard=false", f"logging.log_dir={log_dir}",
               "checkpoint.save=null", *SIZES[size]["overrides"], *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the {size} {run} run failed (exit {done.returncode}): {last} (its console.log, if it "
                           f"got that far: {log_dir})")
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in records if "train/tokens_per_s" in r and r["step"] > warmup]

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in kept)

    return TrainThroughput(size=size, run=run, tokens_per_s=median("train/tokens_per_s"),
                           tflops=median("train/tflops"), mfu=median("train/mfu"), step_s=median("train/step_s"))


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
