"""Checkpoints: DeepSpeed's engine state plus megamoe's own (step, data position, every RNG, config).

Layout of `<save>/iter_0000010/`: DeepSpeed's model/optimizer/scheduler files, `rng_state_rank<r>.pt` per
rank (dropout streams differ per rank), `config.yaml` (the resolved config) and `client_state` inside
DeepSpeed's model file (iteration, consumed samples). `<save>/latest` names the newest tag.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megamoe.config import RunConfig, dump
from megamoe.utils import get_logger


@dataclass(frozen=True)
class Progress:
    """Where training stands: optimizer steps done and global samples consumed."""

    iteration: int = 0
    consumed_samples: int = 0


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


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


def save(engine, cfg: RunConfig, progress: Progress) -> Path:
    """Write a checkpoint of this step under cfg.checkpoint.save; every rank calls this."""
    assert cfg.checkpoint.save is not None
    tag = tag_for(progress.iteration)
    tag_dir = Path(cfg.checkpoint.save) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    torch.save(rng_state(), tag_dir / f"rng_state_rank{rank}.pt")
    if rank == 0:
        (tag_dir / "config.yaml").write_text(dump(cfg))
    # RNG and config files exist before DeepSpeed's save publishes the tag in `latest`.
    dist.barrier()
    engine.save_checkpoint(cfg.checkpoint.save, tag=tag,
                           client_state={"iteration": progress.iteration,
                                         "consumed_samples": progress.consumed_samples})
    get_logger().info(f"saved checkpoint {tag_dir}")
    return tag_dir


def load(engine, cfg: RunConfig) -> Progress:
    """Resume from cfg.checkpoint.load's latest tag; a fresh Progress when there is none."""
    load_dir = cfg.checkpoint.load
    if load_dir is None or not (Path(load_dir) / "latest").is_file():
        if load_dir is not None:
            get_logger().warning(f"no checkpoint in {load_dir} ('latest' missing): starting a new run")
        return Progress()
    path, client_state = engine.load_checkpoint(load_dir)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint named by {load_dir}/latest")
    tag_dir = Path(load_dir) / (Path(load_dir) / "latest").read_text().strip()
    rng_file = tag_dir / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        get_logger().warning(f"{rng_file} missing (different world size?): random streams restart")
    progress = Progress(iteration=client_state["iteration"], consumed_samples=client_state["consumed_samples"])
    get_logger().info(f"resumed from {tag_dir} at iteration {progress.iteration}")
    return progress
