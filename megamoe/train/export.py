"""A megamoe checkpoint of any TP/EP layout -> one full state dict -> a Hugging Face directory.

The tensor-parallel shards of DeepSpeed's `mp_rank_XX_model_states.pt` files are merged with megatron's own
partition attributes (read from the same model built in this process with TP = 1); the routed experts come from
megamoe's `experts_ep*.pt` shards, placed by global expert id. Nothing but the checkpoint and its config is read.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from megamoe import config
from megamoe.config import RunConfig
from megamoe.hf import native
from megamoe.models.sharding import merge_tp
from megamoe.train import checkpoint
from megamoe.utils import get_logger


def one_process_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    """The run's model with TP = EP = 1 in this process (its parameters carry megatron's partition attributes)."""
    from megamoe.models.gpt import build_model
    from megamoe.parallel.initialize import initialize

    single = dataclasses.replace(cfg, parallel=config.ParallelConfig())
    return build_model(single, vocab_size, initialize(single.parallel, cfg.train.seed))


def merged_state_dict(tag_dir: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the checkpoint as a full tensor, named as in `model` (TP = 1, all experts local)."""
    tp, _ = checkpoint.saved_layout(tag_dir)
    modules = [torch.load(tag_dir / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"]
               for r in range(tp)]
    experts = _expert_tensors(tag_dir)
    merged = {}
    for name, param in model.named_parameters():
        if name in experts:
            merged[name] = experts[name]
        elif name in modules[0]:
            merged[name] = merge_tp([m[name] for m in modules], param).float()
        else:
            raise ValueError(f"{tag_dir} lacks {name}: the checkpoint does not fit its own config.yaml")
    return merged


def _expert_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Each expert parameter, [E, ...] over all experts, from the shards (written by any EP size)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for path in sorted(tag_dir.glob("experts_ep*.pt")):
        for module, shard in torch.load(path, weights_only=True).items():
            for pname, tensor in shard["tensors"].items():
                parts.setdefault(f"{module}.{pname}", []).append((shard["first_expert"], tensor))
    return {name: torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])]).float()
            for name, pieces in parts.items()}


def export_hf(load_dir: str, out_dir: str, dtype: str = "float32") -> Path:
    """Write the HF directory of the latest checkpoint under `load_dir`; returns it."""
    from megamoe.data.tokenizer import spm_vocab_size

    tag_dir = checkpoint.latest_tag_dir(load_dir)
    if tag_dir is None:
        raise FileNotFoundError(f"{load_dir} holds no checkpoint ('latest' missing); pass a run's checkpoint.save")
    cfg = config.load(tag_dir / "config.yaml")
    native.check_exportable(cfg)
    tokenizer_model = Path(cfg.data.tokenizer_model)
    vocab_size = spm_vocab_size(tokenizer_model)
    if vocab_size is None:
        raise FileNotFoundError(f"the run's tokenizer {tokenizer_model} is missing; the export ships it")
    model = one_process_model(cfg, vocab_size)
    state = native.to_hf(merged_state_dict(tag_dir, model), native.arch(cfg, vocab_size))
    hf_model = hf_model_from(cfg, vocab_size, state)
    out = Path(out_dir)
    hf_model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer_model, out)
    get_logger().info(f"exported {tag_dir} as {type(hf_model).__name__} to {out}")
    return out


def hf_model_from(cfg: RunConfig, vocab_size: int, state: dict[str, torch.Tensor]):
    """The transformers model holding `state` (every tensor must be used)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    hf_cfg = native.hf_config(cfg, vocab_size)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    hf_model.load_state_dict(state, strict=True, assign=True)
    if hf_cfg.tie_word_embeddings:
        hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(
        bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id, pad_token_id=hf_cfg.pad_token_id,
        max_length=hf_cfg.max_position_embeddings)
    return hf_model.eval()


def save_tokenizer(tokenizer_model: Path, out: Path) -> None:
    """The sentencepiece model with a Llama tokenizer config (megamoe adds no BOS, as in pre-training)."""
    shutil.copy(tokenizer_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "legacy": False}, indent=2))


def import_hf(hf_dir: str, save_dir: str, base_config: str | None, overrides: list[str]) -> Path:
    """A weights-only megamoe checkpoint (iteration 0) and `finetune.yaml` from a Llama, Mixtral or Qwen2-MoE
    directory holding a sentencepiece `tokenizer.model`. The run's other settings (data, train, parallel) come from
    `base_config` and `overrides`; its model section from config.json. Any TP/EP layout then loads the
    checkpoint (weights are re-cut at load time)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megamoe.data.tokenizer import spm_vocab_size

    source = Path(hf_dir)
    tokenizer_model = source / "tokenizer.model"
    if (vocab_size := spm_vocab_size(tokenizer_model)) is None:
        raise FileNotFoundError(f"{source} has no tokenizer.model: megamoe trains with sentencepiece tokenizers")
    hf_cfg = AutoConfig.from_pretrained(source)
    if hf_cfg.vocab_size != vocab_size:
        raise ValueError(f"{source}: vocab_size {hf_cfg.vocab_size} differs from tokenizer.model's {vocab_size}")
    save = Path(save_dir)
    paths = [f"data.tokenizer_model={tokenizer_model}", f"checkpoint.load={save}", f"checkpoint.save={save}",
             f"logging.log_dir={save / 'logs'}"]
    cfg = config.load(base_config, [*paths, *native.run_overrides(hf_cfg), *overrides])
    native.check_exportable(cfg)  # what imports must export back
    model = one_process_model(cfg, vocab_size)
    hf_state = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    state = native.from_hf(hf_state, native.arch(cfg, vocab_size))
    own = model.state_dict()
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state:  # megatron's padded vocabulary: zero rows beyond the tokenizer's
            state[name] = torch.cat([state[name], own[name].new_zeros(own[name].shape[0] - vocab_size,
                                                                      own[name].shape[1])])
    params = {n for n, _ in model.named_parameters()}
    if missing := sorted(params - state.keys()):
        raise ValueError(f"{source} lacks {len(missing)} of the model's weights, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False)
    single = dataclasses.replace(cfg, parallel=config.ParallelConfig())
    from megamoe.parallel.groups import ParallelGroups

    tag_dir = checkpoint.save_weights_only(model, single, save, ParallelGroups.single_process())
    (save / "finetune.yaml").write_text(config.dump(cfg))
    get_logger().info(f"imported {source} ({hf_cfg.model_type}) into {tag_dir}; train with --config "
                      f"{save / 'finetune.yaml'}")
    return tag_dir
