"""Metrics sinks on global rank 0: console, metrics.jsonl, TensorBoard and Weights & Biases."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml

from megamoe.config import LoggingConfig, RunConfig, dump
from megamoe.utils import get_logger, global_rank


def _wandb_mode() -> str:
    """online only when an API key is configured (env or ~/.netrc); an explicit WANDB_MODE wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


class MetricsWriter:
    """log(step, {"train/loss": ...}) fans out to every enabled sink; other ranks do nothing."""

    def __init__(self, cfg: RunConfig) -> None:
        self.enabled = global_rank() == 0
        self.tensorboard = self.wandb_run = None
        if not self.enabled:
            return
        log: LoggingConfig = cfg.logging
        self.log_dir = Path(log.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.log_dir / "metrics.jsonl").open("a")
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.log_dir / "tensorboard"))
        if log.wandb:
            self.wandb_run = self._start_wandb(cfg)

    def _start_wandb(self, cfg: RunConfig):
        import wandb

        log = cfg.logging
        return wandb.init(project=log.wandb_project, name=log.wandb_exp_name or self.log_dir.name,
                          dir=str(self.log_dir), mode=_wandb_mode(), config=yaml.safe_load(dump(cfg)))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        get_logger().info(f"step {step:>6} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in values.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) and abs(value) < 1e5 else f"{value:.4e}"
