"""megamoe's GPT <-> its own transformers classes (HF custom code in megamoe/hf/remote, `trust_remote_code=True`).

Every MoE variant exports this way (DA-MoE, PEER, CartesianMoE, MPOE), and so do top-k models the native classes
cannot express (router or expert bias, 'add'/'residual' shared experts, masked-LM encoders). The backbone keeps
Llama's names (native.py's table); a MoE layer's tensors keep megamoe's own names under the block's `mlp.`
(`decoder.layers.<i>.mlp.moe.X` <-> `model.layers.<i>.mlp.X`), so conversion is a prefix change both ways.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from megamoe import variants
from megamoe.config import RunConfig
from megamoe.hf import native
from megamoe.hf.native import Arch, UnsupportedExport

TRAINING_ONLY = ("mask_step",)
"""Buffers that only training reads (a step counter of the layer's own): not exported."""


def export_format(cfg: RunConfig) -> str:
    """The model type of native.FAMILIES where a native transformers class expresses the model, else 'megamoe'
    (custom code); UnsupportedExport if neither can."""
    try:
        return native.check_exportable(cfg)
    except UnsupportedExport:
        check_exportable(cfg)
        return "megamoe"


def check_exportable(cfg: RunConfig) -> None:
    """UnsupportedExport naming the first setting megamoe's custom code cannot express."""
    model, moe = cfg.model, cfg.moe
    needs = {"model.normalization": (model.normalization, "RMSNorm"), "model.swiglu": (model.swiglu, True),
             "model.position_embedding_type": (model.position_embedding_type, "rope"),
             "model.add_bias_linear": (model.add_bias_linear, False),
             "model.add_qkv_bias": (model.add_qkv_bias, False), "model.qk_layernorm": (model.qk_layernorm, False)}
    for key, (value, want) in needs.items():
        if value != want:
            raise UnsupportedExport(f"{key}={value}: megamoe's HF export (native or custom code) needs {want}")
    if moe.num_experts is not None and moe.expert_capacity_factor is not None:
        raise UnsupportedExport(f"moe.expert_capacity_factor={moe.expert_capacity_factor}: exported models route "
                                "dropless (which copies a capacity drops depends on the whole batch)")


def arch(cfg: RunConfig, vocab_size: int) -> Arch:
    return dataclasses.replace(native.arch(cfg, vocab_size), native_moe=False)


def moe_options(cfg: RunConfig, a: Arch, megatron: dict[str, Tensor]) -> dict:
    """The run's moe section for the remote code, with the sizes it needs resolved (the expert width, and what the
    variant's hf_options hook reads off the weights)."""
    moe = dataclasses.asdict(cfg.moe) | {"ffn_hidden_size": a.moe_ffn_hidden_size}
    hook = variants.of(cfg.moe).hf_options
    if hook is not None:
        moe |= variants.resolve(hook)(cfg.moe, f"decoder.layers.{a.moe_layers[0]}.mlp.moe.", megatron)
    return moe


def hf_config(cfg: RunConfig, vocab_size: int, megatron: dict[str, Tensor], special_ids: dict[str, int | None]):
    """The MegamoeConfig of the exported model (auto_map added when the model is saved); `special_ids` as
    native.hf_config takes them."""
    from megamoe.hf.remote.configuration_megamoe import MegamoeConfig

    a, model = arch(cfg, vocab_size), cfg.model
    return MegamoeConfig(
        vocab_size=vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_groups, head_dim=a.head_dim,
        intermediate_size=a.ffn_hidden_size, rms_norm_eps=model.norm_epsilon, rope_theta=float(model.rotary_base),
        max_position_embeddings=model.max_position_embeddings or cfg.data.seq_length,
        initializer_range=model.init_method_std, is_causal=model.objective == "causal_lm",
        moe=moe_options(cfg, a, megatron) if cfg.moe.num_experts is not None else {},
        moe_layers=list(a.moe_layers), tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        dtype="bfloat16" if cfg.train.bf16 else "float32", **special_ids)


def model_class(cfg: RunConfig):
    """MegamoeForCausalLM, or MegamoeForMaskedLM for an encoder; registered so save_pretrained ships the code."""
    from megamoe.hf.remote.configuration_megamoe import MegamoeConfig
    from megamoe.hf.remote.modeling_megamoe import MegamoeForCausalLM, MegamoeForMaskedLM

    MegamoeConfig.register_for_auto_class()
    if cfg.model.objective == "masked_lm":
        MegamoeForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
        return MegamoeForMaskedLM
    MegamoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    return MegamoeForCausalLM


def _moe_prefixes(a: Arch) -> list[tuple[str, str]]:
    return [(f"decoder.layers.{i}.mlp.moe.", f"model.layers.{i}.mlp.") for i in a.moe_layers]


def to_hf(megatron: dict[str, Tensor], a: Arch) -> dict[str, Tensor]:
    """The custom model's state dict: the backbone in Llama names, MoE layers under their block's `mlp.`."""
    out = native.to_hf(megatron, a)
    for ours, theirs in _moe_prefixes(a):
        out |= {theirs + name[len(ours):]: t.contiguous() for name, t in megatron.items()
                if name.startswith(ours) and name.rsplit(".", 1)[-1] not in TRAINING_ONLY}
    return out


def from_hf(hf: dict[str, Tensor], a: Arch) -> dict[str, Tensor]:
    """megamoe's full state dict from to_hf's names."""
    out = native.from_hf(hf, a)
    for ours, theirs in _moe_prefixes(a):
        out |= {ours + name[len(theirs):]: t.contiguous() for name, t in hf.items() if name.startswith(theirs)}
    return out


def run_overrides(hf_cfg) -> list[str]:
    """The model and moe overrides of megamoe's config for a megamoe custom-code config."""
    layers = hf_cfg.num_hidden_layers
    moe = {k: v for k, v in hf_cfg.moe.items() if k not in ("mpo_tensor_shapes",)}
    out = [f"model.num_layers={layers}", f"model.hidden_size={hf_cfg.hidden_size}",
           f"model.num_attention_heads={hf_cfg.num_attention_heads}",
           f"model.num_query_groups={hf_cfg.num_key_value_heads}", f"model.kv_channels={hf_cfg.head_dim}",
           f"model.ffn_hidden_size={hf_cfg.intermediate_size}", f"model.norm_epsilon={hf_cfg.rms_norm_eps}",
           f"model.rotary_base={int(hf_cfg.rope_theta)}",
           f"model.max_position_embeddings={hf_cfg.max_position_embeddings}",
           f"model.untie_embeddings_and_output_weights={str(not hf_cfg.tie_word_embeddings).lower()}",
           f"model.objective={'causal_lm' if hf_cfg.is_causal else 'masked_lm'}"]
    if moe:
        flags = [int(i in hf_cfg.moe_layers) for i in range(layers)]
        moe["layer_freq"] = flags
        out += [f"moe.{key}={_yaml(value)}" for key, value in moe.items()]
    return out


def _yaml(value) -> str:
    """A value as a one-line YAML flow scalar/collection (what config overrides parse). JSON is YAML, and a
    quoted string stays a string (a bare `on` or `off` would parse as a boolean)."""
    import json

    return json.dumps(value)
