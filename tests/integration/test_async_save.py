"""Checkpoints written in the background (checkpoint.async_save, the default): a kill during the write leaves
`latest` on the previous checkpoint, which loads; training goes on while a save is written. (The bit-identical
resume from background-written checkpoints is tests/integration/test_resume.py's.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.helpers import run_training, spawn, start_rank

WAIT_S = 240


def _train_with_a_write_that_hangs(data: dict, save: str, log_dir: str, marker: str) -> None:
    """Saves at steps 2, 4, 6; the write of step 4 stops half way (optimizer state written, nothing else) until this
    process is killed."""
    from megamoe.train import reshard

    real_write, calls = reshard.write, []

    def write_then_hang(snapshot, directory, group=None):
        real_write(snapshot, directory, group)
        calls.append(directory)
        if len(calls) == 2:
            Path(marker).write_text(str(directory))
            time.sleep(3600)

    reshard.write = write_then_hang
    run_training(data, f"checkpoint.save={save}", "checkpoint.save_interval=2", "train.train_iters=6",
                 f"logging.log_dir={log_dir}", "train.log_interval=1")


def _steps_logged(log_dir: Path) -> list[int]:
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"train/loss"' in line]


def _resume(data: dict, save: str, log_dir: str) -> dict:
    from megamoe.train import checkpoint, startup
    from megamoe.train.loop import build_trainer
    from tests.helpers import tiny_config

    cfg = tiny_config(data, f"checkpoint.load={save}", f"logging.log_dir={log_dir}")
    tag_dir = checkpoint.latest_tag_dir(save)
    trainer = build_trainer(cfg, startup.check(cfg))
    return {"tag": tag_dir.name, "iteration": trainer.progress.iteration}


def test_a_kill_during_the_background_write_leaves_latest_on_the_previous_checkpoint(tiny_data, tmp_path):
    save, log_dir, marker = tmp_path / "ckpt", tmp_path / "run", tmp_path / "writing"
    proc = start_rank(_train_with_a_write_that_hangs, tiny_data, str(save), str(log_dir), str(marker))
    try:
        deadline = time.monotonic() + WAIT_S
        # Training goes on while step 4's checkpoint is being written: steps 5 and 6 are logged during the write.
        while not (marker.is_file() and 6 in _steps_logged(log_dir)):
            assert proc.is_alive(), f"training ended (exit code {proc.exitcode}) before the write of step 4 hung"
            assert time.monotonic() < deadline, f"no hung write of step 4 within {WAIT_S} s"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.join(timeout=30)
    staging = save / ".partial" / "iter_0000004"
    assert (save / "latest").read_text() == "iter_0000002"
    assert not (save / "iter_0000004").exists(), "the killed save was published"
    assert (staging / "optimizer_any_layout").is_dir() and not (staging / "mp_rank_00_model_states.pt").exists(), \
        "the kill did not come half way through the write"
    got = spawn(_resume, 1, tiny_data, str(save), str(tmp_path / "resumed"))[0]
    assert got == {"tag": "iter_0000002", "iteration": 2}
