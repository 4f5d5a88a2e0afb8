"""Metrics reach metrics.jsonl, TensorBoard and an offline W&B run."""

from __future__ import annotations

import json

from tests.helpers import tiny_config


def test_metrics_sinks(tiny_data, tmp_path, monkeypatch):
    from megamoe.train.metrics import MetricsWriter

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = tiny_config(tiny_data, f"logging.log_dir={tmp_path}/run", "logging.wandb=true", "logging.tensorboard=true")
    writer = MetricsWriter(cfg)
    writer.log(1, {"train/loss": 5.0, "train/lr": 1e-3})
    writer.log(2, {"valid/ppl": 120.5})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(record.pop("time"), float) for record in records)  # unix time of each record
    assert records == [{"step": 1, "train/loss": 5.0, "train/lr": 1e-3}, {"step": 2, "valid/ppl": 120.5}]
    assert {"config.yaml", "console.log"} <= {p.name for p in (tmp_path / "run").iterdir()}
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_is_offline_without_a_key(monkeypatch, tmp_path):
    from megamoe.train.metrics import _wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert _wandb_mode() == "online"


def test_a_resumed_run_logs_each_step_once_and_continues_its_wandb_run(tiny_data, tmp_path, monkeypatch):
    """Resumed at step 2 (its checkpoint), a run replays steps 3.. : their first records go, the W&B id stays; a run
    starting at step 0 starts both afresh."""
    from megamoe.train.metrics import ExpertLoadLog, MetricsWriter

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = tiny_config(tiny_data, f"logging.log_dir={tmp_path}/run", "logging.wandb=true", "train.train_iters=4")

    def run(first: int, last: int) -> str:
        writer, loads = MetricsWriter(cfg, resume_step=first - 1), ExpertLoadLog(cfg.logging.log_dir, first - 1)
        for step in range(first, last + 1):
            writer.log(step, {"train/loss": float(step), "train/elapsed_s": 61.0, "train/eta_s": 3723.0})
            loads.add(step, {"layer1": [0.5, 0.5]})
        run_id = writer.wandb_run.id
        writer.close()
        return run_id

    first_id = run(1, 3)  # killed after step 3, its last checkpoint at step 2
    assert run(3, 4) == first_id
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    loads = [json.loads(line)["step"] for line in (tmp_path / "run" / "expert_load.jsonl").read_text().splitlines()]
    assert loads == [1, 2, 3, 4]
    console = (tmp_path / "run" / "console.log").read_text()
    assert "step      4/4 | 0:01:01 elapsed, ETA 1:02:03 | train/loss 4" in console
    assert run(1, 1) != first_id  # a new run in the same log_dir
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_the_expert_load_picture_stays_bounded_for_a_deep_model(tmp_path, monkeypatch):
    """32 MoE layers: one picture under 1,600 pixels tall (it grew 1.6 inches per layer before)."""
    from matplotlib.image import imread

    from megamoe.train.metrics import ExpertLoadLog

    monkeypatch.setenv("RANK", "0")
    log = ExpertLoadLog(str(tmp_path))
    for step in range(1, 6):
        log.add(step, {f"layer{i}": [0.25 if e == step % 8 else 0.75 / 7 for e in range(8)] for i in range(1, 33)})
    height, width = imread(log.write_heatmap()).shape[:2]
    assert height <= 1600 and width <= 1000, (width, height)
