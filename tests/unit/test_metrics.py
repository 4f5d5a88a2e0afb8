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
    assert records == [{"step": 1, "train/loss": 5.0, "train/lr": 1e-3}, {"step": 2, "valid/ppl": 120.5}]
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
