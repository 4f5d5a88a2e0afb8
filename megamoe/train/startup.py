"""Checks before anything heavy starts: the launcher calls `check` before any process group exists."""

from __future__ import annotations

import os
import sys

import torch

from megamoe.config import Environment, Layout, RunConfig, validate
from megamoe.data.tokenizer import spm_mask_id, spm_vocab_size
from megamoe.parallel.launch import discover_ranks


def environment(cfg: RunConfig) -> Environment:
    """Facts validation needs: world size from the launcher's environment, CUDA, the tokenizer's size."""
    return Environment(world_size=int(os.environ.get("WORLD_SIZE", "1")),
                       cuda_available=torch.cuda.is_available(),
                       tokenizer_vocab_size=spm_vocab_size(cfg.data.tokenizer_model),
                       tokenizer_has_mask=spm_mask_id(cfg.data.tokenizer_model) is not None)


def check(cfg: RunConfig) -> Layout:
    """Validate `cfg` for this launch (ConfigError on a mistake) and select DeepSpeed's accelerator. The ranks
    come from the launcher first (deepspeed, torchrun, srun or mpirun: parallel/launch.py)."""
    discover_ranks()
    env = environment(cfg)
    layout = validate(cfg, env)
    check_data_files(cfg, env)
    set_runtime_environment(env.cuda_available)
    return layout


def check_data_files(cfg: RunConfig, env: Environment) -> None:
    """ConfigError naming a dataset file that is truncated, foreign or tokenized with another tokenizer."""
    from megamoe.config import ConfigError
    from megamoe.config.validate import parse_data_path
    from megamoe.data.checks import check_indexed_dataset

    prefixes, _ = parse_data_path(cfg.data.data_path)
    for prefix in prefixes:
        if problem := check_indexed_dataset(prefix, cfg.data.tokenizer_model, env.tokenizer_vocab_size):
            raise ConfigError(f"data.data_path: {problem}")


def set_runtime_environment(cuda_available: bool) -> None:
    """Environment DeepSpeed reads at import: its accelerator, and where it JIT-builds C++ ops."""
    if not cuda_available:
        # DeepSpeed picks its accelerator at import; its CPU accelerator communicates over gloo.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # One JIT cache per environment: two environments sharing ~/.cache/torch_extensions rebuild each
    # other's ops on every start (integration.md 1).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    # PyTorch's CPU allocator asks for transparent huge pages for large tensors: a fresh 1 GB gradient (PEER's
    # tables) then costs ~70 ms instead of ~300+ ms of 4 KB page faults. Read at every allocation.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
