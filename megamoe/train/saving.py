"""Writing checkpoints (the layout is train/checkpoint.py's): each rank's part copied at the step boundary into a
Snapshot, then written and published, before training goes on or (Saver, checkpoint.async_save) by a background
thread while it does. Runs whose state DeepSpeed keeps (ZeRO-3, fp16 without ZeRO) save through DeepSpeed's engine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.config import RunConfig
from megamoe.moe import MoELayer
from megamoe.moe.experts import Experts
from megamoe.parallel import experts as expert_shards
from megamoe.parallel.groups import ParallelGroups
from megamoe.train import integrity
from megamoe.train.checkpoint import (
    RESHARD_DIR,
    Progress,
    expert_modules,
    require_finite_weights,
    rng_state,
    run_records,
    save_expert_shard,
    tag_for,
    write_run_records,
)
from megamoe.utils import get_logger


@dataclass
class Snapshot:
    """One rank's part of a checkpoint, copied to host memory at a step boundary: what it writes, under `tag`."""

    tag: str
    iteration: int
    files: dict[str, object]
    """File name -> object for torch.save: the RNG streams, the expert shard, the model file."""
    texts: dict[str, str]
    """File name -> text (rank 0: the resolved config, the tokenizer record)."""
    optimizer: object
    """reshard.OptimizerSnapshot."""


def take_snapshot(engine, cfg: RunConfig, progress: Progress, groups: ParallelGroups, copy=None) -> Snapshot:
    """This step's checkpoint content on this rank, each tensor passed through `copy` (reshard.HostCopies: copies in
    host memory, so training may change the live state while they are written; default: the live tensors, for a
    write training waits for). Collective. Refused (CheckpointError) if any weight is not finite."""
    from megamoe.train import reshard  # (imports DeepSpeed: not for the tools that only read checkpoints)

    copy = copy or reshard.in_host_memory
    require_finite_weights(engine.module, progress.iteration)
    sync_moe_buffers(engine.module)
    files: dict[str, object] = {f"rng_state_rank{dist.get_rank()}.pt": rng_state()}
    experts = expert_shards.shard_state(expert_modules(engine.module), groups, lambda n, t: copy(f"experts/{n}", t))
    if experts is not None:
        files[experts[0]] = experts[1]
    if groups.dp_rank == 0:  # one copy of each tensor- and pipeline-parallel shard of the dense weights
        files[model_file_name(groups)] = model_file_state(engine, progress, groups,
                                                          lambda n, t: copy(f"model/{n}", t))
    texts = run_records(cfg) if dist.get_rank() == 0 else {}
    return Snapshot(tag_for(progress.iteration), progress.iteration, files, texts,
                    reshard.snapshot(engine, engine.module, groups, copy))


def sync_moe_buffers(model: torch.nn.Module) -> None:
    """Make every rank's MoE buffers equal (collective): the model file holds one rank's copy."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.sync_buffers()


def model_file_name(groups: ParallelGroups) -> str:
    """DeepSpeed's name of the model file of this rank's tensor- and pipeline-parallel shard."""
    return f"mp_rank_{groups.pp_rank * groups.tp_size + groups.tp_rank:02d}_model_states.pt"


def model_file_state(engine, progress: Progress, groups: ParallelGroups, copy) -> dict:
    """The model file, in DeepSpeed's layout (`module`: this shard's weights and buffers without the routed experts,
    which are in the expert shards; the run's scalars beside it), each tensor passed through `copy`."""
    expert_names = _expert_parameter_names(engine.module)
    module = {name: copy(name, value) if isinstance(value, torch.Tensor) else value
              for name, value in engine.module.state_dict().items() if name not in expert_names}
    return {"module": module, "iteration": progress.iteration, "consumed_samples": progress.consumed_samples,
            "megamoe_skipped_steps": progress.skipped_steps,
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps, "dp_world_size": groups.dp_size,
            "mp_world_size": groups.tp_size * groups.pp_size}


def _expert_parameter_names(model: torch.nn.Module) -> set[str]:
    """The state-dict names of the routed experts' parameters (local names)."""
    return {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, Experts)
            for p, _ in m.named_parameters(recurse=False)}


def write_snapshot(snap: Snapshot, save_dir: str, keep_last: int | None, group: dist.ProcessGroup | None = None
                   ) -> Path:
    """Write a snapshot into the staging directory (integrity.begin made it) and publish it. Collective over `group`
    (all ranks; None: the default group). A failure on any rank fails every rank with the same CheckpointError and
    publishes nothing: `latest` stays on the previous checkpoint."""
    from megamoe.train import reshard

    staging = integrity.staging_dir(save_dir, snap.tag)

    def write_mine() -> None:
        with integrity.writing(staging, snap.iteration):
            reshard.write(snap.optimizer, staging / RESHARD_DIR, group)  # first: its collectives fail on every rank
            for name, value in snap.files.items():
                torch.save(value, staging / name)
            for name, text in snap.texts.items():
                (staging / name).write_text(text)

    integrity.on_every_rank(write_mine, group)
    return integrity.publish(save_dir, snap.tag, keep_last, group)


def save(engine, cfg: RunConfig, progress: Progress, groups: ParallelGroups) -> Path:
    """Write a checkpoint of this step under cfg.checkpoint.save and publish it atomically (train/integrity.py),
    before returning; every rank calls this. Refused (CheckpointError) if any weight is not finite."""
    assert cfg.checkpoint.save is not None
    if deepspeed_keeps_the_state(engine):
        return save_through_deepspeed(engine, cfg, progress, groups)
    snap = take_snapshot(engine, cfg, progress, groups)
    integrity.begin(cfg.checkpoint.save, snap.tag)
    tag_dir = write_snapshot(snap, cfg.checkpoint.save, cfg.checkpoint.keep_last)
    get_logger().info(f"saved checkpoint {tag_dir}")
    return tag_dir


def deepspeed_keeps_the_state(engine) -> bool:
    """Whether part of the training state is only in DeepSpeed's own structures: ZeRO-3's partitioned parameters,
    fp16 without ZeRO's fp32 master weights (FP16_Optimizer's flat groups, CUDA only)."""
    return engine.zero_optimization_stage() == 3 or (engine.fp16_enabled() and engine.zero_optimization_stage() == 0)


def save_through_deepspeed(engine, cfg: RunConfig, progress: Progress, groups: ParallelGroups) -> Path:
    """The checkpoint of a run whose state DeepSpeed keeps (deepspeed_keeps_the_state): DeepSpeed's engine writes
    it (and loads it, at the same layout only), synchronously; megamoe adds its own files."""
    require_finite_weights(engine.module, progress.iteration)
    sync_moe_buffers(engine.module)
    tag = tag_for(progress.iteration)
    staging = integrity.begin(cfg.checkpoint.save, tag)
    with integrity.writing(staging, progress.iteration):
        torch.save(rng_state(), staging / f"rng_state_rank{dist.get_rank()}.pt")
        save_expert_shard(engine.module, staging, groups)
        if dist.get_rank() == 0:
            write_run_records(staging, cfg)
        engine.save_checkpoint(str(staging.parent), tag=tag, save_latest=False,
                               client_state={"iteration": progress.iteration,
                                             "consumed_samples": progress.consumed_samples,
                                             # DeepSpeed keeps a `skipped_steps` of its own under that name
                                             "megamoe_skipped_steps": progress.skipped_steps})
        tag_dir = integrity.publish(cfg.checkpoint.save, tag, cfg.checkpoint.keep_last)
    get_logger().info(f"saved checkpoint {tag_dir}")
    return tag_dir


class Saver:
    """Checkpoints of a training run: written before `save` returns, or (checkpoint.async_save) by a background
    thread from a snapshot taken at the step boundary while training continues. At most one save is in flight: the
    next waits for it. The background writes communicate over a process group of their own (gloo, host memory), so
    they never interleave with training's collectives. A background save that failed raises its CheckpointError
    at the next save or at `wait`."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.background = cfg.checkpoint.async_save and cfg.checkpoint.save is not None
        # Every rank creates the group, in the same order (new_group is collective).
        self.group = dist.new_group(backend="gloo") if self.background and dist.get_world_size() > 1 else None
        self.thread: threading.Thread | None = None
        self.outcome: Path | BaseException | None = None
        self.copies = None  # reshard.HostCopies: the snapshot's buffers, kept for the next save
        self.write_s = 0.0
        """Seconds the last background write took (snapshot to publication)."""

    def save(self, engine, progress: Progress, groups: ParallelGroups, wait: bool = False) -> float:
        """Checkpoint this step (every rank calls it); `wait`: return once it is published (the last step, a stop
        signal). Returns the seconds training waited (the whole write when synchronous; the snapshot, and any wait
        for the previous save, when not)."""
        started = time.perf_counter()
        self.wait()
        save_dir, keep_last = self.cfg.checkpoint.save, self.cfg.checkpoint.keep_last
        if not self.background or deepspeed_keeps_the_state(engine):
            save(engine, self.cfg, progress, groups)
        else:
            from megamoe.train.reshard import HostCopies

            self.copies = self.copies or HostCopies()
            snap = take_snapshot(engine, self.cfg, progress, groups, self.copies)
            integrity.begin(save_dir, snap.tag)
            self.thread = threading.Thread(target=self._write, args=(snap, save_dir, keep_last, started),
                                           name=f"megamoe-save-{snap.tag}", daemon=True)
            self.thread.start()
            if wait:
                self.wait()
        return time.perf_counter() - started

    def _write(self, snap: Snapshot, save_dir: str, keep_last: int | None, started: float) -> None:
        try:
            self.outcome = write_snapshot(snap, save_dir, keep_last, self.group)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, which raises it
            self.outcome = err
        self.write_s = time.perf_counter() - started

    def wait_quietly(self) -> None:
        """`wait`, a failure logged rather than raised (training is already ending with an error of its own)."""
        try:
            self.wait()
        except Exception as err:  # noqa: BLE001 - the error ending training is the one to raise
            get_logger().warning(f"the checkpoint written in the background failed too: {err}")

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is published; raises its error. Returns its directory."""
        if self.thread is None:
            return None
        self.thread.join()
        self.thread, outcome, self.outcome = None, self.outcome, None
        if isinstance(outcome, BaseException):
            raise outcome
        get_logger().info(f"saved checkpoint {outcome} (written in the background in {self.write_s:.1f} s)")
        return outcome
