"""Metrics sinks on global rank 0: console, metrics.jsonl, TensorBoard and Weights & Biases."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megamoe.config import LoggingConfig, RunConfig, dump
from megamoe.moe import MoELayer
from megamoe.parallel.groups import ParallelGroups
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
        shown = {k: v for k, v in values.items() if "/layer" not in k}  # per-layer values: files and dashboards
        get_logger().info(f"step {step:>6} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))

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


def moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def collect_moe_metrics(model: torch.nn.Module, groups: ParallelGroups) -> tuple[dict[str, float], dict[str, list]]:
    """Every MoE layer's statistics since the last call, summed over the ranks that saw different tokens, and
    gathered from every pipeline stage.

    Returns scalar metrics (per layer: load imbalance max/mean, dropped share, mean and max experts per token,
    balancing, z and router losses, the K histogram of variable-K layers; and their means over the model) and
    each layer's expert load (share of copies per expert). Collective: every rank calls it.
    """
    scalars, loads = gather_over_pipeline(_stage_moe_metrics(model, groups), groups)
    for name, combine in (("balance_loss", _mean), ("load_max_over_mean", max), ("dropped_frac", _mean),
                          ("experts_per_token_mean", _mean)):
        values = [v for k, v in scalars.items() if k.endswith(f"/{name}")]
        if values:
            scalars[f"moe/{name}"] = combine(values)
    return scalars, loads


def _stage_moe_metrics(model: torch.nn.Module, groups: ParallelGroups) -> tuple[dict[str, float], dict[str, list]]:
    """Per-layer metrics and loads of this stage's MoE layers."""
    layers = moe_layers(model)
    if not layers:
        return {}, {}
    device = next(model.parameters()).device
    stats = [layer.pop_stats() for layer in layers]
    flat = torch.cat([stats_vector(layer, s, device) for layer, s in zip(layers, stats, strict=True)])
    k_max = torch.stack([s.get("k_max", torch.zeros(())).float().to(device) for s in stats])
    if groups.tp_dp_group is not None:
        dist.all_reduce(flat, group=groups.tp_dp_group)
        dist.all_reduce(k_max, op=dist.ReduceOp.MAX, group=groups.tp_dp_group)
    scalars, loads, offset = {}, {}, 0
    for i, layer in enumerate(layers):
        sums = {}
        for name, length in layer.stat_layout():
            sums[name], offset = flat[offset:offset + length], offset + length
        label = layer.shape.label
        if "tokens_per_expert" in sums:
            loads[label] = (sums["tokens_per_expert"] / sums["tokens_per_expert"].sum().clamp(min=1.0)).tolist()
        scalars.update(layer_metrics(f"moe/{label}", sums, k_max[i]))
    return scalars, loads


def gather_over_pipeline(values, groups: ParallelGroups):
    """Merge a stage's dict (or tuple of dicts) of per-layer values with the other stages' (layers are named
    globally, so keys never clash). Collective over the pipeline group; a no-op without pipeline parallelism."""
    if groups.pp_group is None:
        return values
    gathered = [None] * groups.pp_size
    dist.all_gather_object(gathered, values, group=groups.pp_group)
    if isinstance(values, dict):
        return {k: v for part in gathered for k, v in part.items()}
    return tuple({k: v for part in gathered for k, v in part[i].items()} for i in range(len(values)))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def stats_vector(layer: MoELayer, stats: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The layer's summed statistics as one flat vector, in its stat_layout order (zeros where absent)."""
    return torch.cat([stats[name].float().reshape(-1).to(device) if name in stats
                      else torch.zeros(length, device=device) for name, length in layer.stat_layout()])


def layer_metrics(prefix: str, sums: dict[str, torch.Tensor], k_max: torch.Tensor) -> dict:
    """The metrics a layer's summed statistics give (each only if the layer records its inputs)."""
    copies, valid = sums["copies"].squeeze(), sums["valid_tokens"].squeeze()
    forwards = sums["forwards"].squeeze().clamp(min=1e-9)
    out = {f"{prefix}/experts_per_token_mean": (copies / valid.clamp(min=1.0)).item()}
    if "tokens_per_expert" in sums:
        load_E = sums["tokens_per_expert"]
        out[f"{prefix}/load_max_over_mean"] = (load_E.max() / load_E.mean().clamp(min=1e-9)).item()
        out[f"{prefix}/experts_per_token_max"] = k_max.item()
    if "dropped" in sums:
        out[f"{prefix}/dropped_frac"] = (sums["dropped"].squeeze() / (copies + sums["dropped"].squeeze()).clamp(
            min=1.0)).item()
    for name in ("balance_loss", "z_loss", "router_loss"):
        if name in sums:
            out[f"{prefix}/{name}"] = (sums[name].squeeze() / forwards).item()
    if "k_hist" in sums:  # share of valid tokens with K = 0, 1, ... experts
        hist = sums["k_hist"] / sums["k_hist"].sum().clamp(min=1.0)
        out.update({f"{prefix}/k{k}_frac": v for k, v in enumerate(hist.tolist())})
    return out


class ExpertLoadLog:
    """Expert load per layer over training: expert_load.jsonl while training, expert_load.png at the end."""

    def __init__(self, log_dir: str) -> None:
        self.enabled = global_rank() == 0
        self.path = Path(log_dir) / "expert_load.jsonl"
        self.history: dict[str, list[tuple[int, list[float]]]] = {}

    def add(self, step: int, loads: dict[str, list[float]]) -> None:
        if not self.enabled or not loads:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps({"step": step, "load": loads}) + "\n")
        for layer, share in loads.items():
            self.history.setdefault(layer, []).append((step, share))

    def write_heatmap(self) -> Path | None:
        """One panel per MoE layer: steps left to right, experts top to bottom, colour = share of copies."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = sorted(self.history, key=lambda label: (len(label.rstrip("ab")), label))  # layer2 before layer10
        fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.6 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers, strict=True):
            steps, shares = zip(*self.history[layer], strict=True)
            image = ax.imshow(torch.tensor(shares).T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                              extent=(steps[0] - 0.5, steps[-1] + 0.5, len(shares[0]) - 0.5, -0.5))
            ax.set_ylabel(f"{layer}\nexpert")
            fig.colorbar(image, ax=ax, label="share of copies")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load")
        fig.tight_layout()
        out = self.path.with_suffix(".png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
