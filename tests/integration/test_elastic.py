"""Elastic resume: a 4-process launch killed mid-run is restarted with 2 processes on the same checkpoint
directory and continues from its latest checkpoint with the optimizer state (train/reshard.py): the losses after
the checkpoint equal an uninterrupted 4-process run's (fp32, dropout off: the only difference is the order of the
data-parallel sums)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import ROOT, launch_command, run_launch

STEPS, SAVE_EVERY = 12, 4
TOLERANCE = 1e-6
MODEL = ["moe.num_experts=4", "moe.ffn_hidden_size=64", "parallel.expert_model_parallel_size=2",
         "model.hidden_dropout=0", "model.attention_dropout=0", f"train.train_iters={STEPS}",
         f"train.eval_interval={STEPS}", f"checkpoint.save_interval={SAVE_EVERY}"]
TIMEOUT_S = 420


def _command(data: dict, log_dir: Path, ranks: int, ckpt: Path) -> list[str]:
    cmd = launch_command(data, log_dir, *MODEL, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}")
    cmd[cmd.index("--num_gpus") + 1] = str(ranks)
    return cmd


def _losses(log_dir: Path) -> dict[int, float]:
    path = log_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _kill_after(cmd: list[str], log_dir: Path, step: int) -> None:
    """Launch, and kill every process of the launch (SIGKILL: no checkpoint on the way out) once `step` is logged."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while max(_losses(log_dir), default=0) < step:
            assert proc.poll() is None, f"the launch ended before step {step}:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the launch did not reach the step in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_killed_4_process_run_continues_on_2_processes(tiny_data, tmp_path):
    run_launch(_command(tiny_data, tmp_path / "full", 4, tmp_path / "full_ckpt"), TIMEOUT_S)
    want = _losses(tmp_path / "full")

    ckpt = tmp_path / "ckpt"
    _kill_after(_command(tiny_data, tmp_path / "first", 4, ckpt), tmp_path / "first", SAVE_EVERY + 2)
    latest = (ckpt / "latest").read_text().strip()
    resumed_from = int(latest.removeprefix("iter_"))
    assert resumed_from >= SAVE_EVERY, latest
    run_launch(_command(tiny_data, tmp_path / "second", 2, ckpt), TIMEOUT_S)
    got = _losses(tmp_path / "second")
    assert sorted(got) == list(range(resumed_from + 1, STEPS + 1)), sorted(got)
    rel = {step: abs(got[step] - want[step]) / abs(want[step]) for step in got}
    print(f"4 processes killed after step {SAVE_EVERY + 2}, resumed from {latest} on 2: steps "
          f"{resumed_from + 1}-{STEPS} {[round(got[s], 6) for s in sorted(got)]} vs uninterrupted "
          f"{[round(want[s], 6) for s in sorted(got)]}, max rel {max(rel.values()):.1e}")
    assert max(rel.values()) <= TOLERANCE, rel
