"""Parameter groups, the AdamW optimizer and megatron-core's learning-rate schedule."""

from __future__ import annotations

import torch

from megamoe.config import TrainConfig
from megamoe.utils import warn_once


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict]:
    """Weight decay on matrices only: norms and biases (1-D) get wd_mult 0 (Megatron's rule). Parameters with
    an `lr_mult` attribute (MPOE's tensors) get groups of their own whose max_lr / min_lr, which megatron's
    scheduler reads per group, are scaled by it. Frozen parameters are left out."""
    buckets: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            key = (0.0 if param.dim() == 1 else 1.0, float(getattr(param, "lr_mult", 1.0)))
            buckets.setdefault(key, []).append(param)
    groups = []
    # Plain groups first: the trainer logs the first group's learning rate.
    for (wd_mult, lr_mult), params in sorted(buckets.items(), key=lambda kv: (kv[0][1] != 1.0, -kv[0][0], kv[0][1])):
        group = {"params": params, "wd_mult": wd_mult, "name": "decay" if wd_mult else "no_decay"}
        if lr_mult != 1.0:
            group.update(name=f"{group['name']}_lr_x{lr_mult:g}", lr_mult=lr_mult, max_lr=train.lr * lr_mult,
                         min_lr=train.min_lr * lr_mult)
        groups.append(group)
    return groups


class StepGuard:
    """Mixin: while `overflow` is set, step() applies nothing.

    DeepSpeed runs ZeRO-0 in fp32 with megamoe's optimizer as it is, without the overflow check its ZeRO and bf16
    optimizers have; the trainer raises this flag for a step whose gradient norm is not finite, and DeepSpeed's
    engine reads the same attribute to count the step as skipped and hold the LR schedule."""

    overflow = False

    def step(self, closure=None):
        if self.overflow:
            return None
        return super().step(closure)


class GuardedAdamW(StepGuard, torch.optim.AdamW):
    pass


def build_optimizer(groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    """NVIDIA apex's FusedAdam on CUDA when apex is importable; torch's fused AdamW otherwise (one kernel per
    parameter on a CPU too: 4x faster than its per-tensor loop there). Both with the StepGuard."""
    kwargs = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                  weight_decay=train.weight_decay)
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            warn_once("NVIDIA apex is not installed: using torch.optim.AdamW(fused=True)")
        else:
            return type("GuardedFusedAdam", (StepGuard, FusedAdam), {})(groups, adam_w_mode=True, **kwargs)
    return GuardedAdamW(groups, fused=True, **kwargs)


def lr_scheduler_factory(train: TrainConfig):
    """A callable DeepSpeed gives its wrapped optimizer to: megatron-core's OptimizerParamScheduler.

    Megatron semantics: linear warm-up from 0 over lr_warmup_iters, then cosine/linear/constant decay
    to min_lr at lr_decay_iters; weight decay constant. Stepped once per optimizer step. A resumed run keeps
    only the checkpoint's step count: its schedule is this config's (Megatron's --override-opt_param-scheduler),
    so what config.yaml records is what trains.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    def build(optimizer) -> OptimizerParamScheduler:
        return OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
            lr_warmup_steps=train.lr_warmup_iters, lr_decay_steps=train.lr_decay_iters or train.train_iters,
            lr_decay_style=train.lr_decay_style, start_wd=train.weight_decay, end_wd=train.weight_decay,
            wd_incr_steps=train.train_iters, wd_incr_style="constant", override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False)

    return build


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, train: TrainConfig) -> None:
    """After a resume: the optimizer's parameter groups came back with the checkpoint's Adam betas, epsilon and
    per-group peak rates (torch restores them with its state); give them this config's, then let the scheduler
    (built with this config's schedule) set the rate and weight decay of the resumed step."""
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = (train.adam_beta1, train.adam_beta2), train.adam_eps
        if "lr_mult" in group:
            group["max_lr"], group["min_lr"] = train.lr * group["lr_mult"], train.min_lr * group["lr_mult"]
    if scheduler is not None:
        scheduler.step(increment=0)
