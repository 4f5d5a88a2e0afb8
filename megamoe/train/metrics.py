"""Metrics sinks on global rank 0: console, metrics.jsonl, TensorBoard and Weights & Biases."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megamoe.config import LoggingConfig, RunConfig, dump
from megamoe.moe import MoELayer
from megamoe.moe.host import read_on_host
from megamoe.parallel.groups import ParallelGroups
from megamoe.utils import get_logger, global_rank


def _wandb_mode() -> str:
    """online only when an API key is configured (env or ~/.netrc); an explicit WANDB_MODE wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


CLOCK = ("train/elapsed_s", "train/eta_s")
"""Shown as h:mm:ss after the step on the console; plain seconds in the files."""


class MetricsWriter:
    """log(step, {"train/loss": ...}) fans out to every enabled sink; other ranks do nothing.

    At start log_dir receives the resolved config.yaml, the generated deepspeed.json (with a layout) and console.log
    (a copy of megamoe's console lines). A run resumed at step N (`resume_step`) keeps the records of steps up to N
    in metrics.jsonl (the steps it replays are logged again, once), purges TensorBoard's events after N, and
    continues the W&B run whose id log_dir keeps (wandb_run_id; W&B itself keeps the first values it received for
    the replayed steps and ignores the repeats); a run starting at step 0 starts all of them afresh."""

    def __init__(self, cfg: RunConfig, layout=None, resume_step: int = 0) -> None:
        self.enabled = global_rank() == 0
        self.tensorboard = self.wandb_run = None
        self.total = cfg.train.train_iters
        if not self.enabled:
            return
        log: LoggingConfig = cfg.logging
        self.log_dir = Path(log.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._write_run_files(cfg, layout)
        keep_records_up_to(self.log_dir / "metrics.jsonl", resume_step)
        self.jsonl = (self.log_dir / "metrics.jsonl").open("a")
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.log_dir / "tensorboard"),
                                             purge_step=resume_step + 1 if resume_step > 0 else None)
            self.tensorboard.add_hparams(flat_hparams(yaml.safe_load(dump(cfg))), {}, run_name=".")
        if log.wandb:
            self.wandb_run = self._start_wandb(cfg, resume_step)

    def _write_run_files(self, cfg: RunConfig, layout) -> None:
        (self.log_dir / "config.yaml").write_text(dump(cfg))
        if layout is not None:
            from megamoe.train.deepspeed import to_deepspeed_config

            (self.log_dir / "deepspeed.json").write_text(json.dumps(to_deepspeed_config(cfg, layout), indent=1))
        logger = get_logger()
        console = str((self.log_dir / "console.log").resolve())
        if not any(getattr(h, "baseFilename", None) == console for h in logger.handlers):
            handler = logging.FileHandler(console)
            handler.setFormatter(logger.handlers[0].formatter)
            logger.addHandler(handler)
            self.console_handler = handler

    def _start_wandb(self, cfg: RunConfig, resume_step: int):
        import wandb

        log, id_file = cfg.logging, self.log_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step > 0 and id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id)
        return wandb.init(project=log.wandb_project, name=log.wandb_exp_name or self.log_dir.name,
                          dir=str(self.log_dir), mode=_wandb_mode(), config=yaml.safe_load(dump(cfg)), id=run_id,
                          resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        # per-layer values: files and dashboards
        shown = {k: v for k, v in values.items() if "/layer" not in k and k not in CLOCK}
        clock = (f" | {_hms(values['train/elapsed_s'])} elapsed, ETA {_hms(values['train/eta_s'])}"
                 if all(k in values for k in CLOCK) else "")
        get_logger().info(f"step {step:>6}/{self.total}{clock} | "
                          + " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if getattr(self, "console_handler", None) is not None:
            get_logger().removeHandler(self.console_handler)
            self.console_handler.close()


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records of `path` (JSON lines with a "step") after `step`, or all of them at step 0: the steps a
    resumed run replays are logged again by it."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if step > 0 and _step_of(line) <= step]
    if len(kept) != len(lines):
        temporary = path.with_suffix(".tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)


def _step_of(line: str) -> float:
    record = _record(line)
    return math.inf if record is None else record.get("step", math.inf)


def _record(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:  # a line cut by a kill mid-write
        return None


def flat_hparams(tree: dict, prefix: str = "") -> dict:
    """A nested config as TensorBoard hparams: dotted keys, scalar values (lists and None as text)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_hparams(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def largest_memory_gib(device: torch.device) -> float:
    """memory_gib of the rank that uses the most (a pipeline's last stage, a loaded expert rank): the number a job
    is sized by. Collective over the world."""
    value = torch.tensor([memory_gib(device)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory on CUDA; this process's resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:  # not Linux: the peak instead (KiB on Linux and BSD, bytes on macOS)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**30 if sys.platform == "darwin" else 2**20)


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
    """Per-layer metrics and loads of this stage's MoE layers: one all-reduce and one host read for all of them."""
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
    # One read for the whole log line: on an accelerator a read per metric would be a synchronisation each.
    values = read_on_host(torch.cat([flat, k_max]), "the MoE statistics of a logged step")
    k_max_values = values[flat.numel():]
    scalars, loads, offset = {}, {}, 0
    for i, layer in enumerate(layers):
        sums = {}
        for name, length in layer.stat_layout():
            sums[name], offset = values[offset:offset + length], offset + length
        label = layer.shape.label
        if "tokens_per_expert" in sums:
            loads[label] = shares(sums["tokens_per_expert"])
        scalars.update(layer_metrics(f"moe/{label}", sums, k_max_values[i]))
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


def shares(counts: list[float]) -> list[float]:
    """Each count over their sum (at least 1)."""
    total = max(sum(counts), 1.0)
    return [n / total for n in counts]


def stats_vector(layer: MoELayer, stats: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The layer's summed statistics as one flat vector, in its stat_layout order (zeros where absent)."""
    return torch.cat([stats[name].float().reshape(-1).to(device) if name in stats
                      else torch.zeros(length, device=device) for name, length in layer.stat_layout()])


def layer_metrics(prefix: str, sums: dict[str, list[float]], k_max: float) -> dict:
    """The metrics a layer's summed statistics give (each only if the layer records its inputs); one-element
    statistics are lists of one."""
    copies, valid, forwards = sums["copies"][0], sums["valid_tokens"][0], max(sums["forwards"][0], 1e-9)
    out = {f"{prefix}/experts_per_token_mean": copies / max(valid, 1.0)}
    if "tokens_per_expert" in sums:
        load_E = sums["tokens_per_expert"]
        out[f"{prefix}/load_max_over_mean"] = max(load_E) / max(_mean(load_E), 1e-9)
        out[f"{prefix}/experts_per_token_max"] = k_max
    if "dropped" in sums:
        dropped = sums["dropped"][0]
        out[f"{prefix}/dropped_frac"] = dropped / max(copies + dropped, 1.0)
    for name in ("balance_loss", "z_loss", "router_loss"):
        if name in sums:
            out[f"{prefix}/{name}"] = sums[name][0] / forwards
    if "k_hist" in sums:  # share of valid tokens with K = 0, 1, ... experts
        out.update({f"{prefix}/k{k}_frac": v for k, v in enumerate(shares(sums["k_hist"]))})
    return out


class ExpertLoadLog:
    """Expert load per layer over training: expert_load.jsonl while training, expert_load.png at the end."""

    def __init__(self, log_dir: str, resume_step: int = 0) -> None:
        self.enabled = global_rank() == 0
        self.path = Path(log_dir) / "expert_load.jsonl"
        self.history: dict[str, list[tuple[int, list[float]]]] = {}
        if self.enabled:  # the steps a resumed run replays are recorded again by it
            keep_records_up_to(self.path, resume_step)
            for record in map(json.loads, self.path.read_text().splitlines() if self.path.is_file() else []):
                for layer, share in record["load"].items():
                    self.history.setdefault(layer, []).append((record["step"], share))

    def add(self, step: int, loads: dict[str, list[float]]) -> None:
        if not self.enabled or not loads:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps({"step": step, "load": loads}) + "\n")
        for layer, share in loads.items():
            self.history.setdefault(layer, []).append((step, share))

    def write_heatmap(self) -> Path | None:
        """One panel per MoE layer: steps left to right, experts top to bottom, colour = share of copies on one
        scale for every layer, white at 1/E (balanced), red above, blue below. At most 16 inches tall."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm

        layers = sorted(self.history, key=lambda label: (len(label.rstrip("ab")), label))  # layer2 before layer10
        experts = len(self.history[layers[0]][0][1])
        highest = max(max(share) for layer in layers for _, share in self.history[layer])
        norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0 / experts, vmax=max(highest, 2.0 / experts))
        height = min(1.2 + 1.2 * len(layers), MAX_FIGURE_INCHES)
        fig, axes = plt.subplots(len(layers), 1, figsize=(9, height), squeeze=False, sharex=True)
        for ax, layer in zip(axes[:, 0], layers, strict=True):
            steps, shares = zip(*self.history[layer], strict=True)
            image = ax.imshow(torch.tensor(shares).T.numpy(), aspect="auto", cmap="RdBu_r", norm=norm,
                              interpolation="nearest",
                              extent=(steps[0] - 0.5, steps[-1] + 0.5, len(shares[0]) - 0.5, -0.5))
            ax.set_ylabel(layer, rotation=0, ha="right", va="center", fontsize=8)
            ax.set_yticks([])
        axes[-1, 0].set_xlabel("step")
        bar = fig.colorbar(image, ax=axes[:, 0].tolist(), label="share of the layer's expert copies")
        bar.set_ticks([0.0, 1.0 / experts, norm.vmax])
        bar.set_ticklabels(["0", f"1/E = {1.0 / experts:.3f}\n(balanced)", f"{norm.vmax:.3f}"])
        fig.suptitle(f"expert load: {len(layers)} MoE layers x {experts} experts (rows), over training")
        out = self.path.with_suffix(".png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


MAX_FIGURE_INCHES = 16.0
"""Pictures stay under 1,600 pixels tall at 100 dpi, whatever the number of layers."""


def write_loss_curve(log_dir: str) -> Path | None:
    """loss.png from metrics.jsonl: the training loss at every logged step and the validation loss."""
    path = Path(log_dir) / "metrics.jsonl"
    if global_rank() != 0 or not path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [record for line in path.read_text().splitlines() if (record := _record(line)) is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, style in (("train/loss", "-"), ("valid/loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"loss: {Path(log_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(log_dir) / "loss.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
