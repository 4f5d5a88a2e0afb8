"""Checkpoints: weights, expert shards, optimizer state in global coordinates, megamoe's own state.

Layout of `<save>/iter_0000010/`: the model file of each tensor- and pipeline-parallel shard in DeepSpeed's layout
(`mp_rank_<m>_model_states.pt`, m = pp_rank x TP + tp_rank, from data-parallel rank 0: the shard's dense weights
and buffers, decoder layers numbered from 0 within the stage, the LR scheduler and step counters);
`experts_ep<r>.pt` (`experts_ep<r>_pp<s>.pt` per pipeline stage s), the routed experts of expert-parallel rank r
keyed by their module's global name and global expert id; `optimizer_any_layout/` (train/reshard.py), Adam's
moments and fp32 master weights written with torch.distributed.checkpoint, each rank its own part;
`rng_state_rank<r>.pt` per rank (dropout streams differ per rank); `config.yaml` (the resolved config).
`<save>/latest` names the newest tag. train/saving.py writes them (in the background while training continues, by
default), train/integrity.py publishes them whole.

A resume, at the saved layout or any other, loads the weights before the engine exists (tensor-parallel shards
merged and re-cut when TP changes, layers taken from whichever stage held them, experts from the shards that hold
this rank's), then the optimizer state, each rank reading the saved pieces that overlap its own part; the step
count, data position and LR schedule continue, and at the saved layout the random streams too (bit-identical
losses). Checkpoints written by DeepSpeed's engine (earlier megamoe) still load: at their own layout through
DeepSpeed's loader. Before anything loads, tensors' shapes are compared with the model's (ShapeMismatch names
the first that differs), and the loaded weights must be finite. `checkpoint.finetune` and weights-only
checkpoints (written by tools/upcycle.py: a model file, expert shards and a `weights_only` marker) load the
weights the same way and start at iteration 0.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megamoe.config import RunConfig, dump
from megamoe.models.sharding import merge_tp, shard_tp, shift_layer_index
from megamoe.moe.experts import Experts
from megamoe.parallel import experts as expert_shards
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


def latest_tag_dir(load_dir: str | None, save_dir: str | None = None) -> Path | None:
    """The checkpoint `<load_dir>/latest` names. None without a load_dir, or when load_dir is save_dir and holds
    no checkpoint yet (the first start of a job that resumes where it saves); otherwise a load_dir that holds
    no checkpoint is a CheckpointError saying what to pass (integrity.find_checkpoint)."""
    if load_dir is None:
        return None
    same = save_dir is not None and integrity.same_directory(load_dir, save_dir)
    return integrity.find_checkpoint(load_dir, new_run_ok=same)


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


def expert_modules(model: torch.nn.Module) -> dict[str, Experts]:
    """This stage's expert modules by their global name."""
    offset = layer_offset(model)
    return {shift_layer_index(name, offset): m for name, m in model.named_modules() if isinstance(m, Experts)}


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first decoder layer (megatron numbers its layers globally)."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def save_expert_shard(model: torch.nn.Module, tag_dir: Path, groups: ParallelGroups) -> None:
    """The first expert-data-parallel replica of each EP rank (of each stage) writes its experts."""
    expert_shards.save_shard(expert_modules(model), tag_dir, groups)


def load_expert_shards(model: torch.nn.Module, tag_dir: Path) -> None:
    """Fill this rank's experts from the shards, whatever EP and PP sizes wrote them. A shard missing or not
    fitting for any rank fails on every rank (collective: the others would die in the next collective)."""
    integrity.on_every_rank(lambda: _fill_experts(model, tag_dir))


def _fill_experts(model: torch.nn.Module, tag_dir: Path, files: list[Path] | None = None) -> None:
    """The shards' errors as the checkpoint's: ShapeMismatch (a CheckpointError) or CheckpointError. `files`: the
    shards to read (default: all)."""
    try:
        expert_shards.fill_local_experts(expert_modules(model), tag_dir, files)
    except expert_shards.ExpertShapeMismatch as err:
        raise ShapeMismatch(str(err)) from None
    except expert_shards.ExpertShardError as err:
        raise integrity.CheckpointError(str(err)) from None


def needed_shards(model: torch.nn.Module, tag_dir: Path, saved: SavedLayout, groups: ParallelGroups) -> list[Path]:
    """The expert-shard files holding this rank's experts (a rank reads its own share, not every shard)."""
    per_stage = saved.num_layers // saved.pp

    def stage_of(name: str) -> tuple[int, int]:
        layer = re.search(r"layers\.(\d+)\.", name)
        return (int(layer.group(1)) // per_stage if layer else 0), saved.pp

    return expert_shards.shards_holding(expert_modules(model), tag_dir, saved.ep, groups.ep_size, stage_of)


RESHARD_DIR = "optimizer_any_layout"
"""The optimizer state in global coordinates (train/reshard.py), for a resume under another layout."""


class ShapeMismatch(integrity.CheckpointError):
    """A checkpoint tensor whose shape differs from the model's: the model is not the one the checkpoint holds."""


def require_fit(saved: dict, own: dict[str, torch.Tensor], where: Path, elsewhere: set[str] = frozenset()) -> None:
    """ShapeMismatch naming the first tensor of `own` (this rank's state dict) that `saved` lacks, holds with another
    shape, or the first saved one the model lacks; `elsewhere`: names loaded from other files (expert shards)."""
    missing = sorted(own.keys() - saved.keys() - elsewhere)
    unexpected = sorted(saved.keys() - own.keys() - elsewhere)
    if missing or unexpected:
        raise ShapeMismatch(f"{where}: this model's {missing[:2]} are not in the checkpoint" if missing else
                            f"{where}: the checkpoint's {unexpected[:2]} are not in this model")
    for name, tensor in own.items():
        value = saved.get(name)
        if isinstance(tensor, torch.Tensor) and isinstance(value, torch.Tensor) and value.shape != tensor.shape:
            raise ShapeMismatch(f"{where}: {name} is {list(value.shape)} in the checkpoint, {list(tensor.shape)} in "
                                "this model")


def run_records(cfg: RunConfig) -> dict[str, str]:
    """The resolved config and the tokenizer's identity (a resume with another tokenizer is refused)."""
    from megamoe.data.tokenizer import tokenizer_identity

    identity = tokenizer_identity(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    return {"config.yaml": dump(cfg), integrity.TOKENIZER_RECORD: json.dumps(identity)}


def write_run_records(staging: Path, cfg: RunConfig) -> None:
    for name, text in run_records(cfg).items():
        (staging / name).write_text(text)


def require_finite_weights(model: torch.nn.Module, iteration: int) -> None:
    """CheckpointError unless every weight on every rank is finite (a checkpoint must never carry a NaN)."""
    if bad_tensors := count_nonfinite(model):
        raise integrity.CheckpointError(f"not saving step {iteration}: {bad_tensors} weight tensors hold "
                                        "NaN or Inf; the last checkpoint stays the newest")


def count_nonfinite(model: torch.nn.Module) -> int:
    """Weight tensors holding a NaN or Inf, over all ranks. Collective."""
    # On the parameters' device (NCCL reduces CUDA tensors only), one host sync for the whole model.
    bad = torch.stack([~torch.isfinite(p).all() for p in model.parameters()]).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return int(bad.item())


@contextlib.contextmanager
def loading(tag_dir: Path | None, cfg: RunConfig):
    """Around the loads of `tag_dir`: a ShapeMismatch also names the config keys in which the checkpoint differs
    from `cfg` (the likely cause)."""
    try:
        yield
    except ShapeMismatch as err:
        changes = integrity.config_changes(tag_dir, dump(cfg), ("model", "moe"))
        cause = (f"its config differs in {', '.join(changes[:4])}" if changes else
                 "its config.yaml does not explain it: the files do not fit their own config")
        raise ShapeMismatch(f"{err}: this model is not the checkpoint's ({cause}); resume with the checkpoint's "
                            "model settings, or start a new run (checkpoint.finetune cannot change shapes either)"
                            ) from None


def require_finite_loaded(model: torch.nn.Module, tag_dir: Path) -> None:
    """CheckpointError if the weights loaded from `tag_dir` hold NaN or Inf (checkpoint.verify=sizes or none let a
    rewritten file through; training would only report non-finite steps later). Collective."""
    if bad_tensors := count_nonfinite(model):
        raise integrity.CheckpointError(f"{tag_dir} holds NaN or Inf in {bad_tensors} weight tensors: it is damaged "
                                        "(or was saved by a diverged run); resume from an earlier checkpoint")


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
    zero_stage: int = 0
    world_size: int | None = None
    """Ranks that wrote it (one RNG file each); None when unknown (weights-only checkpoints)."""

    def stage_files(self, tag_dir: Path) -> list[list[Path]]:
        """The model files, [stage][tp_rank]."""
        return [[tag_dir / f"mp_rank_{s * self.tp + r:02d}_model_states.pt" for r in range(self.tp)]
                for s in range(self.pp)]

    def stage_offset(self, stage: int) -> int:
        return stage * (self.num_layers // self.pp)


def saved_layout(tag_dir: Path) -> SavedLayout:
    """The tensor-, pipeline- and expert-parallel sizes the checkpoint was written with."""
    saved = integrity.read_saved_config(tag_dir)
    parallel = saved.get("parallel", {})
    ranks = len(list(tag_dir.glob("rng_state_rank*.pt")))
    return SavedLayout(tp=parallel.get("tensor_model_parallel_size", 1),
                       pp=parallel.get("pipeline_model_parallel_size", 1),
                       ep=parallel.get("expert_model_parallel_size", 1),
                       num_layers=saved.get("model", {}).get("num_layers", 1),
                       zero_stage=saved.get("deepspeed", {}).get("zero_stage", 0), world_size=ranks or None)


def global_module_states(tag_dir: Path) -> dict[str, list]:
    """Every entry of the model files by global name: a list over the tensor-parallel ranks."""
    layout = saved_layout(tag_dir)
    out: dict[str, list] = {}
    for stage, files in enumerate(layout.stage_files(tag_dir)):
        for path in files:
            for name, value in _load_model_file(path)["module"].items():
                out.setdefault(shift_layer_index(name, layout.stage_offset(stage)), []).append(value)
    return out


def restarts(tag_dir: Path | None, cfg: RunConfig) -> bool:
    """True when training starts at iteration 0 from the checkpoint's weights (fine-tuning, upcycling)."""
    return tag_dir is not None and (cfg.checkpoint.finetune or integrity.is_weights_only(tag_dir))


def layout_changed(tag_dir: Path, cfg: RunConfig) -> bool:
    """Whether this run's tensor-, pipeline-, expert-parallel or world size differs from the checkpoint's (then
    its per-rank random streams do not apply)."""
    saved, par = saved_layout(tag_dir), cfg.parallel
    return (saved.ep != par.expert_model_parallel_size or saved.tp != par.tensor_model_parallel_size
            or saved.pp != par.pipeline_model_parallel_size
            or saved.world_size not in (None, dist.get_world_size()))


def written_by_deepspeed(tag_dir: Path) -> bool:
    """A checkpoint written by DeepSpeed's engine (ZeRO-3's; any of megamoe before it wrote its own files): its
    optimizer state is in DeepSpeed's files, which load only into the layout that wrote them."""
    return not (tag_dir / RESHARD_DIR).is_dir() or any(tag_dir.glob("*optim_states.pt"))


def loads_weights_only(tag_dir: Path | None, cfg: RunConfig) -> bool:
    """True when the weights of `tag_dir` load before the engine exists (load_weights; the optimizer state then
    comes from its layout-free copy, read for this rank's part only): every checkpoint megamoe writes, at any
    layout, and fine-tuning. False for a checkpoint DeepSpeed's engine wrote, resumed at its own layout (tensor-,
    pipeline-, expert-, data-parallel size and ZeRO stage): DeepSpeed loads it."""
    if tag_dir is None:
        return False
    return (restarts(tag_dir, cfg) or not written_by_deepspeed(tag_dir) or layout_changed(tag_dir, cfg)
            or saved_layout(tag_dir).zero_stage != cfg.deepspeed.zero_stage)


def _load_model_file(path: Path, mmap: bool = False) -> dict:
    """A model file (DeepSpeed's layout), read without executing code (`mmap`: tensors
    read only when touched, e.g. for their shapes)."""
    if not path.is_file():
        raise integrity.CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    return integrity.load_trusted(path, mmap=mmap)


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
        if name in VOCAB_PARALLEL:
            full = _fit_vocab_rows(full, params[name].shape[0] * groups.tp_size)
        module[name] = shard_tp(full, params[name], groups)
    return module


VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")
"""The tensors whose rows megatron pads to a multiple of 128 x TP (the vocabulary)."""


def _fit_vocab_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """Megatron pads the vocabulary to a multiple of 128 x TP: another TP size has other padding rows (never a
    real token's: the tokenizer is checked at start-up), dropped or added as zeros."""
    if full.shape[0] >= rows:
        return full[:rows]
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])


@torch.no_grad()
def load_weights(model: torch.nn.Module, tag_dir: Path, groups: ParallelGroups) -> dict:
    """The model weights of a checkpoint, resharded to this run's layout, before the engine exists (so
    DeepSpeed's fp32 master weights start from them). Returns the saved state for `load`. A checkpoint that does
    not fit on any rank fails on every rank (collective)."""
    return integrity.on_every_rank(lambda: _load_weights(model, tag_dir, groups))


def _load_weights(model: torch.nn.Module, tag_dir: Path, groups: ParallelGroups) -> dict:
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
    require_fit(dense, model.state_dict(), tag_dir, elsewhere=expert_keys)
    model.load_state_dict(dense, strict=False)
    _fill_experts(model, tag_dir, needed_shards(model, tag_dir, saved, groups))
    get_logger().info(f"loaded the weights of {tag_dir}")
    return states


def save_weights_only(model: torch.nn.Module, cfg: RunConfig, save_dir: Path, groups: ParallelGroups) -> Path:
    """A checkpoint of the model's weights at iteration 0 (one process, TP = EP = 1): DeepSpeed's model-file
    layout, megamoe's expert shard and config, the weights-only marker, and `latest`."""
    if groups.tp_size != 1 or groups.ep_size != 1 or dist.get_world_size() != 1:
        raise ValueError("save_weights_only writes one-process checkpoints (tensor and expert parallel size 1)")
    tag = tag_for(0)
    staging = integrity.begin(save_dir, tag)
    with integrity.writing(staging, 0):
        torch.save({"module": model.state_dict(), "iteration": 0, "consumed_samples": 0},
                   staging / "mp_rank_00_model_states.pt")
        save_expert_shard(model, staging, groups)
        write_run_records(staging, cfg)
        (staging / integrity.WEIGHTS_ONLY_MARKER).write_text("written by megamoe without optimizer state: loads as "
                                                             "fine-tuning\n")
        return integrity.publish(save_dir, tag, keep_last=None)


def load(engine, tag_dir: Path | None, groups: ParallelGroups, weights_states: dict | None = None,
         restart: bool = False, same_layout: bool = True) -> Progress:
    """Resume from `tag_dir` (None: a new run); `weights_states` from load_weights when the weights were loaded
    before the engine; `restart`: start at iteration 0 (fine-tuning); `same_layout`: the run has the checkpoint's
    parallel sizes (its random streams apply). Call last in setup: it restores the RNG streams."""
    if tag_dir is None:
        return Progress()
    if restart:
        get_logger().info(f"fine-tuning from the weights of {tag_dir}: iteration 0")
        return Progress()
    if weights_states is not None:
        client_state = weights_states
        _restore_engine_scalars(engine, weights_states)
        if (tag_dir / RESHARD_DIR).is_dir():
            from megamoe.train import reshard

            step = reshard.load(engine, engine.module, groups, tag_dir / RESHARD_DIR)
            get_logger().info(f"optimizer state of {tag_dir} (step {step}) loaded"
                              + ("" if same_layout else ", re-cut for this layout"))
        else:
            get_logger().warning(f"{tag_dir} holds no optimizer state for another layout (saved before megamoe "
                                 f"wrote {RESHARD_DIR}): the optimizer state starts afresh")
    else:
        if engine.zero_optimization_stage() != 3:  # ZeRO-3's files hold placeholders: DeepSpeed checks its own
            model_file = saved_layout(tag_dir).stage_files(tag_dir)[groups.pp_rank][groups.tp_rank]
            integrity.on_every_rank(lambda: require_fit(_load_model_file(model_file, mmap=True)["module"],
                                                        engine.module.state_dict(), tag_dir))
        path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        load_expert_shards(engine.module, tag_dir)  # DeepSpeed's file holds EP rank 0's experts only
    rng_file = tag_dir / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file() and same_layout:
        set_rng_state(torch.load(rng_file, weights_only=True))
    elif same_layout:
        get_logger().warning(f"{rng_file} is missing: the random streams (dropout, data masking) restart from the "
                             "seed, so later losses differ from an uninterrupted run's")
    else:
        get_logger().warning(f"{rng_file.name} not restored (another layout): random streams restart")
    progress = Progress(iteration=client_state["iteration"], consumed_samples=client_state["consumed_samples"],
                        skipped_steps=client_state.get("megamoe_skipped_steps", 0))
    get_logger().info(f"resumed from {tag_dir} at iteration {progress.iteration}")
    return progress


def _restore_engine_scalars(engine, states: dict) -> None:
    """The LR scheduler and DeepSpeed's step counters of a model file (as DeepSpeed's own loader restores them)."""
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    engine.global_steps = states.get("global_steps", states["iteration"])
    engine.global_samples = states.get("global_samples", engine.global_samples)
    engine.skipped_steps = states.get("skipped_steps", engine.skipped_steps)


def fp32_weights(tag_dir: Path, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The dense model weights of a one-process checkpoint (TP = PP = 1) in fp32: the model file's, or for bf16/fp16
    runs the optimizer's fp32 master weights where it holds them."""
    module = _load_model_file(tag_dir / "mp_rank_00_model_states.pt")["module"]
    if not (cfg.train.bf16 or cfg.train.fp16):
        return module
    if written_by_deepspeed(tag_dir):  # the master weights are in DeepSpeed's ZeRO files
        from megamoe.train.deepspeed import zero_fp32_weights

        return zero_fp32_weights(tag_dir)
    from megamoe.train import reshard

    masters = reshard.read_whole(tag_dir / RESHARD_DIR, "master")
    return {name: masters[name].view_as(value) if name in masters else value for name, value in module.items()}
