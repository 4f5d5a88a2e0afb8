"""Upcycling: a dense megamoe checkpoint -> an MoE checkpoint whose experts all start as the dense FFN.

Each MoE layer fills its experts from the dense FFN its own way (MoELayer.load_dense_ffn: top-k and DA-MoE copy
it into every expert; MPOE decomposes it exactly and clones the auxiliary tensors into every expert around one
shared central tensor, docs/variants.md §6.3); a variant's `upcycle_overrides` say whether it can be upcycled and
which settings it starts from. Everything else (attention,
norms, embeddings, dense layers) is copied; routers keep their fresh initialisation (bias 0). The result is a
weights-only checkpoint at iteration 0 plus `finetune.yaml`, the config that fine-tunes it:
    python tools/upcycle.py --load runs/tiny-dense/checkpoints --save runs/upcycled-mpoe moe.variant=mpo \\
        moe.num_experts=8
    deepspeed --num_gpus 2 launchers/pretrain.py --config runs/upcycled-mpoe/finetune.yaml \\
        parallel.expert_model_parallel_size=2 deepspeed.zero_stage=2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from megamoe import config, variants
from megamoe.config import RunConfig
from megamoe.train import checkpoint, integrity
from megamoe.utils import get_logger


def upcyclable() -> list[str]:
    """Variants whose routed experts are FFNs of the dense FFN's shape (PEER's singleton experts and Cartesian's
    two sub-layers have no dense counterpart)."""
    return [name for name, v in variants.VARIANTS.items() if v.upcycle_overrides is not None]


def target_config(dense_tag: Path, save_dir: Path, overrides: Sequence[str]) -> RunConfig:
    """The dense run's config with the MoE overrides (after the variant's upcycling preset) and checkpoint and
    log paths under `save_dir`; its model section must stay the dense one."""
    sections = config.read_sections(dense_tag / "config.yaml")
    dense = config.from_dict(sections)
    if dense.moe.num_experts is not None:
        raise ValueError(f"{dense_tag} already has MoE layers (moe.num_experts={dense.moe.num_experts}); upcycle a "
                         "dense checkpoint")
    sections.pop("moe", None)  # a dense run's moe section holds only defaults (of some variant): start afresh
    variant = variants.of(config.from_dict(sections, overrides).moe)
    if variant.upcycle_overrides is None:
        raise ValueError(f"moe.variant={variant.name} cannot be upcycled from a dense FFN; use one of "
                         f"{', '.join(upcyclable())}")
    paths = [f"checkpoint.load={save_dir}", f"checkpoint.save={save_dir}", "checkpoint.finetune=false",
             f"logging.log_dir={save_dir / 'logs'}"]
    target = config.from_dict(sections, [*paths, *variant.upcycle_overrides, *overrides])
    if target.moe.num_experts is None:
        raise ValueError(f"no MoE layers requested: pass moe.num_experts=<E> (and moe.variant=<one of "
                         f"{', '.join(upcyclable())}>)")
    if target.model != dense.model:
        changed = [f.name for f in dataclasses.fields(dense.model)
                   if getattr(dense.model, f.name) != getattr(target.model, f.name)]
        raise ValueError(f"model.{changed[0]} differs from the dense checkpoint's; upcycling keeps the model")
    dense_width = dense.model.ffn_hidden_size or 4 * dense.model.hidden_size
    if target.moe.ffn_hidden_size not in (None, dense_width):
        raise ValueError(f"moe.ffn_hidden_size={target.moe.ffn_hidden_size}: upcycled experts keep the dense FFN's "
                         f"width ({dense_width}); leave moe.ffn_hidden_size unset")
    return target


@torch.no_grad()
def upcycle_model(model: torch.nn.Module, dense: dict[str, torch.Tensor]) -> list[str]:
    """Fill `model` (with MoE layers) from the dense weights; returns the names of the upcycled MLP slots."""
    from megamoe.models.moe_mlp import MoEMLP

    # Parameters and buffers only: `_extra_state` entries (TE-style layer metadata) are not weights, and
    # zero_to_fp32's state dicts (bf16/fp16 runs) do not hold them.
    own = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    upcycled = []
    for name, module in model.named_modules():
        if isinstance(module, MoEMLP):
            ffn = {key: dense[f"{name}.{key}"] for key in ("linear_fc1.weight", "linear_fc2.weight")}
            if f"{name}.linear_fc1.bias" in dense:
                raise ValueError("upcycling FFNs with biases (model.add_bias_linear=true) is not supported")
            load = getattr(module.moe, "load_dense_ffn", None)
            if load is None:
                raise ValueError(f"moe.variant={type(module.moe).__name__} cannot be upcycled from a dense FFN; "
                                 f"use one of {', '.join(upcyclable())}")
            load(ffn)
            upcycled.append(name)
    copied = {k: v for k, v in dense.items() if k in own}
    if missing := sorted(k for k in own if k not in dense and not any(k.startswith(f"{u}.") for u in upcycled)):
        raise ValueError(f"the dense checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]}")
    model.load_state_dict(copied, strict=False)
    return upcycled


def upcycle(load_dir: str, save_dir: str, overrides: Sequence[str]) -> Path:
    """Write the upcycled checkpoint of the dense checkpoint `load_dir` under `save_dir`; returns its tag dir."""
    from megamoe.data.tokenizer import embedding_rows
    from megamoe.models.gpt import build_model
    from megamoe.parallel.initialize import initialize
    from megamoe.train import startup

    tag = checkpoint.latest_tag_dir(load_dir)
    integrity.require_new_directory(save_dir, "--save")
    checkpoint.verify_for_use(tag, config.load(tag / "config.yaml"))
    saved = checkpoint.saved_layout(tag)
    if (saved.tp, saved.pp) != (1, 1):
        raise ValueError(f"{tag} was written with tensor or pipeline parallelism; upcycle a run with "
                         "tensor_model_parallel_size=1 and pipeline_model_parallel_size=1")
    save = Path(save_dir)
    target = target_config(tag, save, overrides)
    one_process = dataclasses.replace(target, parallel=config.ParallelConfig())
    startup.check(one_process)  # the target must be a valid run (its own layout is checked when it runs)
    groups = initialize(one_process.parallel, one_process.train.seed)
    model = build_model(one_process, embedding_rows(target), groups)
    upcycled = upcycle_model(model, checkpoint.fp32_weights(tag, config.load(tag / "config.yaml")))
    tag_dir = checkpoint.save_weights_only(model, one_process, save, groups)
    (save / "finetune.yaml").write_text(config.dump(target))
    get_logger().info(f"upcycled {len(upcycled)} FFNs of {tag} into {tag_dir} "
                      f"({sum(p.numel() for p in model.parameters()):,} parameters); fine-tune with "
                      f"--config {save / 'finetune.yaml'}")
    return tag_dir
