"""Parameter groups, the AdamW optimizer and megatron-core's learning-rate schedule."""

from __future__ import annotations

import torch

from megamoe.config import TrainConfig
from megamoe.utils import warn_once


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Weight decay on matrices only: norms and biases (1-D) get wd_mult 0 (Megatron's rule)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.dim() == 1 else decay).append(param)
    groups = [{"params": decay, "wd_mult": 1.0, "name": "decay"},
              {"params": no_decay, "wd_mult": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    """NVIDIA apex's FusedAdam on CUDA when apex is importable; torch's AdamW otherwise (fused on CUDA)."""
    kwargs = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                  weight_decay=train.weight_decay)
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            warn_once("NVIDIA apex is not installed: using torch.optim.AdamW(fused=True)")
        else:
            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def lr_scheduler_factory(train: TrainConfig):
    """A callable DeepSpeed gives its wrapped optimizer to: megatron-core's OptimizerParamScheduler.

    Megatron semantics: linear warm-up from 0 over lr_warmup_iters, then cosine/linear/constant decay
    to min_lr at lr_decay_iters; weight decay constant. Stepped once per optimizer step.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    def build(optimizer) -> OptimizerParamScheduler:
        return OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
            lr_warmup_steps=train.lr_warmup_iters, lr_decay_steps=train.lr_decay_iters or train.train_iters,
            lr_decay_style=train.lr_decay_style, start_wd=train.weight_decay, end_wd=train.weight_decay,
            wd_incr_steps=train.train_iters, wd_incr_style="constant")

    return build
