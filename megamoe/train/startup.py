"""Checks before anything heavy starts: the launcher calls `check` before any process group exists."""

from __future__ import annotations

import os

import torch

from megamoe.config import Environment, Layout, RunConfig, validate
from megamoe.data.tokenizer import spm_vocab_size


def environment(cfg: RunConfig) -> Environment:
    """Facts validation needs: world size from the launcher's environment, CUDA, the tokenizer's size."""
    return Environment(world_size=int(os.environ.get("WORLD_SIZE", "1")),
                       cuda_available=torch.cuda.is_available(),
                       tokenizer_vocab_size=spm_vocab_size(cfg.data.tokenizer_model))


def check(cfg: RunConfig) -> Layout:
    """Validate `cfg` for this launch (ConfigError on a mistake) and select DeepSpeed's accelerator."""
    env = environment(cfg)
    layout = validate(cfg, env)
    if not env.cuda_available:
        # DeepSpeed picks its accelerator at import; its CPU accelerator communicates over gloo.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return layout
