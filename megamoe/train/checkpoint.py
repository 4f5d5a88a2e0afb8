"""Checkpoints: DeepSpeed's engine state plus megamoe's own (step, data position, RNG, config, experts).

Layout of `<save>/iter_0000010/`: DeepSpeed's model/optimizer/scheduler files (`mp_rank_<m>_...`, m = pp_rank x
TP + tp_rank: one per tensor-parallel shard of each pipeline stage, decoder layers numbered from 0 within the
stage); `rng_state_rank<r>.pt` per rank (dropout streams differ per rank); `config.yaml` (the resolved config);
`experts_ep<r>.pt` (`experts_ep<r>_pp<s>.pt` per stage s under pipeline parallelism), the routed experts of
expert-parallel rank r keyed by their module's global name and global expert id (DeepSpeed's model file holds
only EP rank 0's experts, integration.md 6.4). `<save>/latest` names the newest tag.

Resuming with the saved tensor-, pipeline- and expert-parallel sizes restores everything. With another layout the
model weights are loaded (TP shards merged and re-cut, layers taken from whichever stage held them, experts placed
from their shards) before the engine exists, the LR schedule and data position continue, and the optimizer state
starts afresh (DeepSpeed cannot reshard it). `checkpoint.finetune` and
weights-only checkpoints (written by tools/upcycle.py: the same files without DeepSpeed's optimizer state, plus
a `weights_only` marker) load the weights the same way and start at iteration 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megamoe.config import RunConfig, dump
from megamoe.models.sharding import merge_tp, shard_tp, shift_layer_index
from megamoe.moe import MoELayer
from megamoe.moe.experts import Experts
from megamoe.parallel.groups import ParallelGroups
from megamoe.train import integrity
from megamoe.utils import get_logger


@dataclass(frozen=True)
class Progress:
    """Where training stands: optimizer steps done and global samples consumed."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient, over the whole run (restarts included)."""


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_tag_dir(load_dir: str | None) -> Path | None:
    """The checkpoint `<load_dir>/latest` names, or None (with a warning if load_dir was given)."""
    if load_dir is None:
        return None
    latest = Path(load_dir) / "latest"
    if not latest.is_file():
        get_logger().warning(f"no checkpoint in {load_dir} ('latest' missing): starting a new run")
        return None
    return Path(load_dir) / latest.read_text().strip()


def rng_state() -> dict:
    """Every generator training draws from, as tensors and plain types (loadable with weights_only)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _experts(model: torch.nn.Module) -> dict[str, Experts]:
    """This stage's expert modules by their global name."""
    offset = layer_offset(model)
    return {shift_layer_index(name, offset): m for name, m in model.named_modules() if isinstance(m, Experts)}


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first decoder layer (megatron numbers its layers globally)."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def save_expert_shard(model: torch.nn.Module, tag_dir: Path, groups: ParallelGroups) -> None:
    """The first expert-data-parallel replica of each EP rank (of each stage) writes its experts."""
    experts = _experts(model)
    if not experts or groups.edp_rank != 0:
        return
    shard = {name: {"first_expert": m.first_expert,
                    "tensors": {p: t.detach().cpu().clone() for p, t in m.named_parameters(recurse=False)}}
             for name, m in experts.items()}
    stage = f"_pp{groups.pp_rank:02d}" if groups.pp_size > 1 else ""
    torch.save(shard, tag_dir / f"experts_ep{groups.ep_rank:03d}{stage}.pt")


@torch.no_grad()
def load_expert_shards(model: torch.nn.Module, tag_dir: Path) -> None:
    """Fill this rank's experts from the shards, whatever EP and PP sizes wrote them."""
    experts = _experts(model)
    if not experts:
        return
    shards = [torch.load(path, weights_only=True) for path in sorted(tag_dir.glob("experts_ep*.pt"))]
    if not shards:
        raise FileNotFoundError(f"{tag_dir} holds no experts_ep*.pt expert shards; it was not written by megamoe "
                                "with MoE layers")
    for name, module in experts.items():
        for pname, param in module.named_parameters(recurse=False):
            filled = torch.zeros(module.num_local, dtype=torch.bool)
            for shard in (s for s in shards if name in s):
                first, saved = shard[name]["first_expert"], shard[name]["tensors"][pname]
                mine = module.first_expert
                lo, hi = max(first, mine), min(first + len(saved), mine + module.num_local)
                if lo < hi:
                    param[lo - mine:hi - mine] = saved[lo - first:hi - first]
                    filled[lo - mine:hi - mine] = True
            if not filled.all():
                raise ValueError(f"{tag_dir}: experts of {name}.{pname} missing from the shards")


def save(engine, cfg: RunConfig, progress: Progress, groups: ParallelGroups) -> Path:
    """Write a checkpoint of this step under cfg.checkpoint.save and publish it atomically (train/integrity.py);
    every rank calls this. Refused (CheckpointError) if any weight is not finite."""
    assert cfg.checkpoint.save is not None
    require_finite_weights(engine.module, progress.iteration)
    tag = tag_for(progress.iteration)
    for module in engine.module.modules():
        if isinstance(module, MoELayer):
            module.sync_buffers()  # DeepSpeed writes rank 0's copy of the buffers
    staging = integrity.begin(cfg.checkpoint.save, tag)
    torch.save(rng_state(), staging / f"rng_state_rank{dist.get_rank()}.pt")
    save_expert_shard(engine.module, staging, groups)
    if dist.get_rank() == 0:
        (staging / "config.yaml").write_text(dump(cfg))
    engine.save_checkpoint(str(staging.parent), tag=tag, save_latest=False,
                           client_state={"iteration": progress.iteration,
                                         "consumed_samples": progress.consumed_samples,
                                         # DeepSpeed keeps a `skipped_steps` of its own under that name
                                         "megamoe_skipped_steps": progress.skipped_steps})
    tag_dir = integrity.publish(cfg.checkpoint.save, tag, cfg.checkpoint.keep_last)
    get_logger().info(f"saved checkpoint {tag_dir}")
    return tag_dir


def require_finite_weights(model: torch.nn.Module, iteration: int) -> None:
    """CheckpointError unless every weight on every rank is finite (a checkpoint must never carry a NaN)."""
    # On the parameters' device (NCCL reduces CUDA tensors only), one host sync for the whole model.
    bad = torch.stack([~torch.isfinite(p).all() for p in model.parameters()]).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    if bad_tensors := int(bad.item()):
        raise integrity.CheckpointError(f"not saving step {iteration}: {bad_tensors} weight tensors hold "
                                        "NaN or Inf; the last checkpoint stays the newest")


def verify_for_use(tag_dir: Path | None, cfg: RunConfig) -> None:
    """Before any file of `tag_dir` is read: complete and intact (checkpoint.verify), and free of code."""
    if tag_dir is None:
        return
    if not tag_dir.is_dir():
        raise integrity.CheckpointError(f"'latest' in {tag_dir.parent} names {tag_dir.name}, which does not exist")
    integrity.verify(tag_dir, cfg.checkpoint.verify)
    integrity.check_loadable(tag_dir)


@dataclass(frozen=True)
class SavedLayout:
    """The parallel sizes a checkpoint was written with."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    num_layers: int = 1

    def stage_files(self, tag_dir: Path) -> list[list[Path]]:
        """DeepSpeed's model files, [stage][tp_rank]."""
        return [[tag_dir / f"mp_rank_{s * self.tp + r:02d}_model_states.pt" for r in range(self.tp)]
                for s in range(self.pp)]

    def stage_offset(self, stage: int) -> int:
        return stage * (self.num_layers // self.pp)


def saved_layout(tag_dir: Path) -> SavedLayout:
    """The tensor-, pipeline- and expert-parallel sizes the checkpoint was written with."""
    saved = yaml.safe_load((tag_dir / "config.yaml").read_text())
    parallel = saved.get("parallel", {})
    return SavedLayout(tp=parallel.get("tensor_model_parallel_size", 1),
                       pp=parallel.get("pipeline_model_parallel_size", 1),
                       ep=parallel.get("expert_model_parallel_size", 1),
                       num_layers=saved.get("model", {}).get("num_layers", 1))


def global_module_states(tag_dir: Path) -> dict[str, list]:
    """Every entry of DeepSpeed's model files by global name: a list over the tensor-parallel ranks."""
    layout = saved_layout(tag_dir)
    out: dict[str, list] = {}
    for stage, files in enumerate(layout.stage_files(tag_dir)):
        for path in files:
            for name, value in _load_model_file(path)["module"].items():
                out.setdefault(shift_layer_index(name, layout.stage_offset(stage)), []).append(value)
    return out


WEIGHTS_ONLY_MARKER = "weights_only"


def is_weights_only(tag_dir: Path) -> bool:
    return (tag_dir / WEIGHTS_ONLY_MARKER).is_file()


def restarts(tag_dir: Path | None, cfg: RunConfig) -> bool:
    """True when training starts at iteration 0 from the checkpoint's weights (fine-tuning, upcycling)."""
    return tag_dir is not None and (cfg.checkpoint.finetune or is_weights_only(tag_dir))


def loads_weights_only(tag_dir: Path | None, cfg: RunConfig) -> bool:
    """True when only the weights of `tag_dir` load, before the engine exists (then load_weights): fine-tuning,
    a weights-only checkpoint, or another tensor-, pipeline- or expert-parallel size than the checkpoint's."""
    if tag_dir is None:
        return False
    saved, par = saved_layout(tag_dir), cfg.parallel
    return (restarts(tag_dir, cfg) or saved.ep != par.expert_model_parallel_size
            or saved.tp != par.tensor_model_parallel_size or saved.pp != par.pipeline_model_parallel_size)


def _load_model_file(path: Path) -> dict:
    """DeepSpeed's model file (written by deepspeed.save_checkpoint), read without executing code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
    return integrity.load_trusted(path)


def _resharded_module(tag_dir: Path, model: torch.nn.Module, groups: ParallelGroups) -> dict:
    """This rank's module state from a checkpoint written with another layout: each parameter merged from the
    saved tensor-parallel shards of whichever stage held it, then cut for this rank; buffers as saved."""
    saved = global_module_states(tag_dir)
    params, offset = dict(model.named_parameters()), layer_offset(model)
    module = {}
    for name in model.state_dict():
        values = saved.get(shift_layer_index(name, offset))
        if values is None:
            continue  # reported by load_weights (experts come from their shards)
        if name not in params or not isinstance(values[0], torch.Tensor):
            module[name] = values[0]
            continue
        full = merge_tp(values, params[name])
        if getattr(params[name], "tensor_model_parallel", False) and params[name].partition_dim == 0:
            full = _fit_vocab_rows(full, params[name].shape[0] * groups.tp_size)
        module[name] = shard_tp(full, params[name], groups)
    return module


def _fit_vocab_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """Megatron pads the vocabulary to a multiple of 128 x TP: another TP size has other padding rows (never a
    real token's), dropped or added as zeros. Other row-sharded tensors already have `rows` rows."""
    if full.shape[0] >= rows:
        return full[:rows]
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])


@torch.no_grad()
def load_weights(model: torch.nn.Module, tag_dir: Path, groups: ParallelGroups) -> dict:
    """The model weights of a checkpoint, resharded to this run's layout, before the engine exists (so
    DeepSpeed's fp32 master weights start from them). Returns the saved state for `load`."""
    saved = saved_layout(tag_dir)
    if (saved.tp, saved.pp) == (groups.tp_size, groups.pp_size):
        states = _load_model_file(saved.stage_files(tag_dir)[groups.pp_rank][groups.tp_rank])
        module = states.pop("module")
    else:
        module = _resharded_module(tag_dir, model, groups)
        states = _load_model_file(saved.stage_files(tag_dir)[0][0])  # the run's scalars (iteration, scheduler)
        states.pop("module")
    expert_keys = {n for n, m in model.named_modules() if isinstance(m, Experts)}
    expert_keys = {f"{n}.{p}" for n in expert_keys for p, _ in model.get_submodule(n).named_parameters(recurse=False)}
    dense = {k: v for k, v in module.items() if k not in expert_keys}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if (not_loaded := sorted(set(missing) - expert_keys)) or unexpected:
        raise ValueError(f"{tag_dir}: checkpoint does not fit the model (missing {not_loaded[:3]}, "
                         f"unexpected {unexpected[:3]})")
    load_expert_shards(model, tag_dir)
    get_logger().warning(f"loaded the weights of {tag_dir} (fine-tuning, a weights-only checkpoint or another "
                         "parallel layout): the optimizer state starts afresh")
    return states


def save_weights_only(model: torch.nn.Module, cfg: RunConfig, save_dir: Path, groups: ParallelGroups) -> Path:
    """A checkpoint of the model's weights at iteration 0 (one process, TP = EP = 1): DeepSpeed's model-file
    layout, megamoe's expert shard and config, the weights-only marker, and `latest`."""
    if groups.tp_size != 1 or groups.ep_size != 1 or dist.get_world_size() != 1:
        raise ValueError("save_weights_only writes one-process checkpoints (tensor and expert parallel size 1)")
    tag = tag_for(0)
    staging = integrity.begin(save_dir, tag)
    torch.save({"module": model.state_dict(), "iteration": 0, "consumed_samples": 0},
               staging / "mp_rank_00_model_states.pt")
    save_expert_shard(model, staging, groups)
    (staging / "config.yaml").write_text(dump(cfg))
    (staging / WEIGHTS_ONLY_MARKER).write_text("written by megamoe without optimizer state: loads as fine-tuning\n")
    return integrity.publish(save_dir, tag, keep_last=None)


def load(engine, tag_dir: Path | None, groups: ParallelGroups, weights_states: dict | None = None,
         restart: bool = False) -> Progress:
    """Resume from `tag_dir` (None: a new run); `weights_states` from load_weights when only the weights were
    loaded; `restart`: start at iteration 0 (fine-tuning). Call last in setup: it restores the RNG streams."""
    if tag_dir is None:
        return Progress()
    if restart:
        get_logger().info(f"fine-tuning from the weights of {tag_dir}: iteration 0")
        return Progress()
    if weights_states is not None:
        client_state = weights_states
        if engine.lr_scheduler is not None and "lr_scheduler" in weights_states:
            engine.lr_scheduler.load_state_dict(weights_states["lr_scheduler"])
    else:
        path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        load_expert_shards(engine.module, tag_dir)  # DeepSpeed's file holds EP rank 0's experts only
    rng_file = tag_dir / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file() and weights_states is None:
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        get_logger().warning(f"{rng_file.name} not restored (another layout): random streams restart")
    progress = Progress(iteration=client_state["iteration"], consumed_samples=client_state["consumed_samples"],
                        skipped_steps=client_state.get("megamoe_skipped_steps", 0))
    get_logger().info(f"resumed from {tag_dir} at iteration {progress.iteration}")
    return progress
