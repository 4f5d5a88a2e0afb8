"""How long training waits for a checkpoint: synchronous saves against background ones (checkpoint.async_save), side
by side, each in a run launched as a user launches one (megamoe/studies/bench_train.py's launch_run: 2 processes,
ZeRO-2, the bundled corpus) with a model large enough for saves to matter.

Model: 8 layers, d = 768, 12 heads, SwiGLU FFN 3,072, sequence 256, fp32 (81.8 M parameters with the bundled
corpus's 4,000-token vocabulary). Each run saves every SAVE_INTERVAL steps; its metrics.jsonl has the seconds each
save held training (`checkpoint/stall_s`). The stall of a synchronous save is the whole save (write, hashes,
publication); of a background save, the snapshot to host memory (and any wait for the previous save). The last
step's save is waited for in both modes and left out.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from megamoe.studies.bench_train import launch_run
from megamoe.studies.compare import StudyData

MODEL = ["model.hidden_size=768", "model.num_layers=8", "model.num_attention_heads=12", "model.num_query_groups=12",
         "model.ffn_hidden_size=3072", "data.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=2",
         "deepspeed.zero_stage=2"]
SAVE_INTERVAL = 4


@dataclass
class SaveTimes:
    mode: str
    parameters: int
    stalls_s: list[float]
    checkpoint_bytes: int
    run_s: float
    """Wall time of the run's training steps (train/elapsed_s at its last step)."""

    @property
    def stall_s(self) -> float:
        return statistics.median(self.stalls_s)


def measure(mode: str, data: StudyData, out: Path, steps: int) -> SaveTimes:
    """One run with synchronous ('sync') or background ('async') saves."""
    log_dir, save = out / mode / "run", out / mode / "ckpt"
    records = launch_run(f"the {mode} checkpoint run", log_dir, data, steps, [
        *MODEL, f"checkpoint.save={save}", f"checkpoint.save_interval={SAVE_INTERVAL}", "checkpoint.keep_last=1",
        f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"])
    stalls = [r["checkpoint/stall_s"] for r in records if "checkpoint/stall_s" in r and r["step"] < steps]
    elapsed = max(r["train/elapsed_s"] for r in records if "train/elapsed_s" in r)
    latest = save / (save / "latest").read_text().strip()
    size = sum(p.stat().st_size for p in latest.rglob("*") if p.is_file())
    module = torch.load(latest / "mp_rank_00_model_states.pt", weights_only=True, mmap=True)["module"]
    parameters = sum(t.numel() for name, t in module.items()
                     if isinstance(t, torch.Tensor) and "_extra_state" not in name)
    return SaveTimes(mode, parameters, stalls, size, elapsed)


def table(sync: SaveTimes, background: SaveTimes) -> str:
    lines = ["| saves | training waits per save, s (median) | each save, s | vs synchronous | run's steps, s |",
             "|---|---|---|---|---|"]
    for times in (sync, background):
        lines.append(f"| {times.mode} | {times.stall_s:.2f} | {', '.join(f'{s:.2f}' for s in times.stalls_s)} | "
                     f"{times.stall_s / sync.stall_s:.2f} | {times.run_s:.1f} |")
    return "\n".join(lines)
