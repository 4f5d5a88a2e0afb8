"""megamoe's GPT (megatron-core parameter names, full unsharded tensors) <-> native transformers classes.

Dense models map to LlamaForCausalLM, with query/key/value biases (`model.add_qkv_bias`) to Qwen2ForCausalLM, with
per-head query/key norms (`model.qk_layernorm`) to Qwen3ForCausalLM. Top-k MoE models with a sigmoid-gated shared
expert (`moe.shared_expert_combine: gate`, any `moe.layer_freq`) map to Qwen2MoeForCausalLM; without one, with
query/key norms (any `moe.layer_freq`) to Qwen3MoeForCausalLM, else (a MoE layer in every block) to
MixtralForCausalLM. OLMoE's query/key norm spans all heads together, which megatron-core's per-head qk_layernorm
cannot express: it is refused. Experts use transformers 5.x's fused layout:
`experts.gate_up_proj` [E, 2F, D] = megamoe's `experts.linear_fc1`, `experts.down_proj` [E, D, F] =
`experts.linear_fc2`. megatron's fused QKV holds, per query group, the group's
query heads then its key head then its value head; the SwiGLU fc1 holds the gate rows then the up rows. The
embedding and output rows beyond the tokenizer's vocabulary (megatron's padding) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megamoe import variants
from megamoe.config import RunConfig
from megamoe.config.validate import moe_layer_numbers

FAMILIES = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
"""The transformers model types megamoe imports and exports natively."""


class UnsupportedExport(ValueError):
    """The model has a feature the native HF class cannot express."""


@dataclass(frozen=True)
class Arch:
    """The sizes the mapping needs, resolved from a run config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    num_experts: int | None
    topk: int | None
    moe_ffn_hidden_size: int | None
    moe_layers: tuple[int, ...]
    """0-based indices of the blocks holding a MoE layer."""
    shared_ffn_hidden_size: int | None
    qkv_bias: bool = False
    """Biases on q, k and v (megatron's fused linear_qkv.bias)."""
    qk_norm: bool = False
    """Per-head query and key norms."""
    native_moe: bool = True
    """MoE layers in Mixtral/Qwen2-MoE names; False: the caller maps them (megamoe's custom code keeps its own)."""


def arch(cfg: RunConfig, vocab_size: int) -> Arch:
    model, moe = cfg.model, cfg.moe
    heads = model.num_attention_heads
    return Arch(num_layers=model.num_layers, hidden_size=model.hidden_size, num_heads=heads,
                num_groups=model.num_query_groups or heads, head_dim=model.kv_channels or model.hidden_size // heads,
                ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size, vocab_size=vocab_size,
                num_experts=moe.num_experts,
                topk=int(variants.of(moe).experts_per_token(moe)) if moe.num_experts is not None else None,
                moe_ffn_hidden_size=moe.ffn_hidden_size or model.ffn_hidden_size or 4 * model.hidden_size,
                moe_layers=tuple(n - 1 for n in moe_layer_numbers(moe, model.num_layers)),
                shared_ffn_hidden_size=moe.shared_expert_intermediate_size, qkv_bias=model.add_qkv_bias,
                qk_norm=model.qk_layernorm)


def check_exportable(cfg: RunConfig) -> str:
    """The model type of FAMILIES that expresses the run; UnsupportedExport naming the first setting none can."""
    model, moe = cfg.model, cfg.moe
    needs = {"model.normalization": (model.normalization, "RMSNorm"), "model.swiglu": (model.swiglu, True),
             "model.position_embedding_type": (model.position_embedding_type, "rope"),
             "model.add_bias_linear": (model.add_bias_linear, False),
             "model.objective": (model.objective, "causal_lm")}
    for key, (value, want) in needs.items():
        if value != want:
            raise UnsupportedExport(f"{key}={value}: the native classes (Llama, Qwen, Mixtral) need {want}")
    if model.add_qkv_bias and model.qk_layernorm:
        raise UnsupportedExport("model.add_qkv_bias=true with model.qk_layernorm=true: no native class has both "
                                "(Qwen2 has the biases, Qwen3 the norms)")
    if moe.num_experts is None:
        return "qwen2" if model.add_qkv_bias else "qwen3" if model.qk_layernorm else "llama"
    if not variants.of(moe).hf_native:
        raise UnsupportedExport(f"moe.variant={moe.variant} has no native transformers class")
    moe_needs = {"moe.expert_capacity_factor": (moe.expert_capacity_factor, None),
                 "moe.router_enable_expert_bias": (moe.router_enable_expert_bias, False),
                 "moe.router_bias": (moe.router_bias, False)}
    for key, (value, want) in moe_needs.items():
        if value != want:
            raise UnsupportedExport(f"{key}={value}: Mixtral and Qwen2-MoE need {want}")
    if moe.shared_expert_intermediate_size is not None:
        if model.qk_layernorm:
            raise UnsupportedExport("model.qk_layernorm=true with a shared expert: Qwen2-MoE, the class with one, has "
                                    "no query/key norm")
        if moe.shared_expert_combine != "gate":
            raise UnsupportedExport(f"moe.shared_expert_combine={moe.shared_expert_combine}: Qwen2-MoE's shared "
                                    "expert is sigmoid-gated (moe.shared_expert_combine=gate)")
        if moe.router_gate != "weights":
            raise UnsupportedExport(f"moe.router_gate={moe.router_gate}: Qwen2-MoE weights experts by probability")
        return "qwen2_moe"
    if model.qk_layernorm:
        if moe.router_gate != "weights":
            raise UnsupportedExport(f"moe.router_gate={moe.router_gate}: Qwen3-MoE weights experts by probability")
        return "qwen3_moe"
    if model.add_qkv_bias:
        raise UnsupportedExport("model.add_qkv_bias=true: Mixtral has no attention biases (Qwen2-MoE has them, with "
                                "a shared expert)")
    if moe.layer_freq != 1:
        raise UnsupportedExport(f"moe.layer_freq={moe.layer_freq}: Mixtral has a MoE layer in every block (a "
                                "sigmoid-gated shared expert would export as Qwen2-MoE)")
    if moe.router_pre_softmax and moe.router_gate != "unit_st":
        raise UnsupportedExport("moe.router_pre_softmax=true: Mixtral renormalises the top-k probabilities "
                                "(megatron's default, router_pre_softmax=false)")
    return "mixtral"


def hf_config(cfg: RunConfig, vocab_size: int, special_ids: dict[str, int | None]):
    """The transformers config of the exported model; `special_ids`: the tokenizer's pad_token_id, bos_token_id and
    eos_token_id."""
    import transformers

    a, model = arch(cfg, vocab_size), cfg.model
    common = dict(vocab_size=vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
                  num_attention_heads=a.num_heads, num_key_value_heads=a.num_groups, head_dim=a.head_dim,
                  hidden_act="silu", max_position_embeddings=model.max_position_embeddings or cfg.data.seq_length,
                  rms_norm_eps=model.norm_epsilon, initializer_range=model.init_method_std,
                  tie_word_embeddings=not model.untie_embeddings_and_output_weights,
                  rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
                  dtype="bfloat16" if cfg.train.bf16 else "float32", **special_ids)
    kind = check_exportable(cfg)
    if kind == "llama":
        return transformers.LlamaConfig(intermediate_size=a.ffn_hidden_size, attention_bias=False, mlp_bias=False,
                                        **common)
    if kind in ("qwen2", "qwen3"):  # Qwen2: q, k, v biases always; Qwen3: q/k norms always
        extra = {} if kind == "qwen2" else {"attention_bias": False}
        return transformers.AutoConfig.for_model(kind, intermediate_size=a.ffn_hidden_size, use_sliding_window=False,
                                                 **extra, **common)
    if kind == "mixtral":
        return transformers.MixtralConfig(intermediate_size=a.moe_ffn_hidden_size, num_local_experts=a.num_experts,
                                          num_experts_per_tok=a.topk, router_aux_loss_coef=cfg.moe.aux_loss_coeff,
                                          **common)
    moe = dict(intermediate_size=a.ffn_hidden_size, moe_intermediate_size=a.moe_ffn_hidden_size,
               num_experts=a.num_experts, num_experts_per_tok=a.topk, norm_topk_prob=not cfg.moe.router_pre_softmax,
               decoder_sparse_step=1, mlp_only_layers=[i for i in range(a.num_layers) if i not in a.moe_layers],
               router_aux_loss_coef=cfg.moe.aux_loss_coeff, use_sliding_window=False)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(attention_bias=False, **moe, **common)
    return transformers.Qwen2MoeConfig(shared_expert_intermediate_size=a.shared_ffn_hidden_size, qkv_bias=a.qkv_bias,
                                       **moe, **common)


def split_qkv(qkv: Tensor, a: Arch) -> tuple[Tensor, Tensor, Tensor]:
    """megatron's [groups x (q_per_group + 2) x head_dim, D] -> q [heads x head_dim, D], k, v [groups x ...]."""
    per_group = a.num_heads // a.num_groups
    grouped = qkv.reshape(a.num_groups, per_group + 2, a.head_dim, -1)
    q, k, v = grouped.split([per_group, 1, 1], dim=1)
    return q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])


def join_qkv(q: Tensor, k: Tensor, v: Tensor, a: Arch) -> Tensor:
    per_group = a.num_heads // a.num_groups
    parts = [t.reshape(a.num_groups, n, a.head_dim, -1) for t, n in ((q, per_group), (k, 1), (v, 1))]
    return torch.cat(parts, dim=1).reshape(-1, q.shape[-1])


def _renames(a: Arch) -> list[tuple[str, str]]:
    """(megamoe name, HF name) of every tensor copied as it is."""
    pairs = [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             ("decoder.final_layernorm.weight", "model.norm.weight"), ("output_layer.weight", "lm_head.weight")]
    for i in range(a.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        pairs += [(src + "input_layernorm.weight", dst + "input_layernorm.weight"),
                  (src + "self_attention.linear_proj.weight", dst + "self_attn.o_proj.weight"),
                  (src + "pre_mlp_layernorm.weight", dst + "post_attention_layernorm.weight")]
        if a.qk_norm:
            pairs += [(src + "self_attention.q_layernorm.weight", dst + "self_attn.q_norm.weight"),
                      (src + "self_attention.k_layernorm.weight", dst + "self_attn.k_norm.weight")]
        if i not in a.moe_layers:
            pairs.append((src + "mlp.linear_fc2.weight", dst + "mlp.down_proj.weight"))
            continue
        if not a.native_moe:
            continue
        pairs += [(src + "mlp.moe.router.weight", dst + "mlp.gate.weight"),
                  (src + "mlp.moe.experts.linear_fc1", dst + "mlp.experts.gate_up_proj"),
                  (src + "mlp.moe.experts.linear_fc2", dst + "mlp.experts.down_proj")]
        if a.shared_ffn_hidden_size is not None:
            pairs += [(src + "mlp.moe.shared_experts.linear_fc2", dst + "mlp.shared_expert.down_proj.weight"),
                      (src + "mlp.moe.shared_experts.gate_weight", dst + "mlp.shared_expert_gate.weight")]
    return pairs


def _gated_fc1s(a: Arch) -> list[tuple[str, str]]:
    """(megamoe SwiGLU fc1 [gate; up], HF MLP prefix with gate_proj and up_proj) of the dense MLPs."""
    pairs = []
    for i in range(a.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        if i not in a.moe_layers:
            pairs.append((src + "mlp.linear_fc1.weight", dst + "mlp."))
        elif a.native_moe and a.shared_ffn_hidden_size is not None:
            pairs.append((src + "mlp.moe.shared_experts.linear_fc1", dst + "mlp.shared_expert."))
    return pairs


def to_hf(megatron: dict[str, Tensor], a: Arch) -> dict[str, Tensor]:
    """HF state dict (the FAMILIES' names) from megamoe's full state dict (vocabulary rows beyond the tokenizer's
    dropped)."""
    out = {hf: megatron[ours] for ours, hf in _renames(a) if ours in megatron}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in out:
            out[name] = out[name][:a.vocab_size]
    for i in range(a.num_layers):
        q, k, v = split_qkv(megatron[f"decoder.layers.{i}.self_attention.linear_qkv.weight"], a)
        out |= {f"model.layers.{i}.self_attn.{x}_proj.weight": t for x, t in zip("qkv", (q, k, v), strict=True)}
        if a.qkv_bias:  # the fused bias is laid out as the fused weight's rows
            biases = split_qkv(megatron[f"decoder.layers.{i}.self_attention.linear_qkv.bias"][:, None], a)
            out |= {f"model.layers.{i}.self_attn.{x}_proj.bias": t[:, 0] for x, t in zip("qkv", biases, strict=True)}
    for ours, prefix in _gated_fc1s(a):
        out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = megatron[ours].chunk(2, dim=0)
    return {name: t.contiguous() for name, t in out.items()}


def from_hf(hf: dict[str, Tensor], a: Arch) -> dict[str, Tensor]:
    """megamoe's full state dict (megatron names, unpadded vocabulary) from to_hf's names."""
    out = {ours: hf[theirs] for ours, theirs in _renames(a) if theirs in hf}
    for i in range(a.num_layers):
        qkv = [hf[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv"]
        out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = join_qkv(*qkv, a)
        if a.qkv_bias:
            biases = [hf[f"model.layers.{i}.self_attn.{x}_proj.bias"][:, None] for x in "qkv"]
            out[f"decoder.layers.{i}.self_attention.linear_qkv.bias"] = join_qkv(*biases, a)[:, 0]
    for ours, prefix in _gated_fc1s(a):
        out[ours] = torch.cat([hf[prefix + "gate_proj.weight"], hf[prefix + "up_proj.weight"]])
    return {name: t.contiguous() for name, t in out.items()}


def run_overrides(hf_cfg) -> list[str]:
    """The model (and moe) overrides of megamoe's config for a transformers config of one of FAMILIES;
    UnsupportedExport naming the feature megamoe cannot express."""
    heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads
    if hf_cfg.model_type == "olmoe":
        raise UnsupportedExport(f"model_type olmoe normalises queries and keys over all heads together (q_norm of "
                                f"width {heads * head_dim}); megatron-core's qk_layernorm normalises each head: "
                                "megamoe cannot express it")
    if hf_cfg.model_type not in FAMILIES:
        raise UnsupportedExport(f"model_type {hf_cfg.model_type!r}: megamoe imports {', '.join(FAMILIES)} and its "
                                "own (megamoe) checkpoints")
    _check_importable(hf_cfg)
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    kind = hf_cfg.model_type
    qkv_bias = kind == "qwen2" or (kind == "qwen2_moe" and getattr(hf_cfg, "qkv_bias", True))
    out = [f"model.num_layers={hf_cfg.num_hidden_layers}", f"model.hidden_size={hf_cfg.hidden_size}",
           f"model.num_attention_heads={heads}", f"model.num_query_groups={hf_cfg.num_key_value_heads or heads}",
           f"model.kv_channels={head_dim}", f"model.ffn_hidden_size={hf_cfg.intermediate_size}",
           f"model.norm_epsilon={hf_cfg.rms_norm_eps}", f"model.rotary_base={int(rope.get('rope_theta', 10000))}",
           f"model.max_position_embeddings={hf_cfg.max_position_embeddings}",
           f"model.untie_embeddings_and_output_weights={str(not hf_cfg.tie_word_embeddings).lower()}",
           "model.normalization=RMSNorm", "model.swiglu=true", "model.position_embedding_type=rope",
           "model.add_bias_linear=false", f"model.add_qkv_bias={str(qkv_bias).lower()}",
           f"model.qk_layernorm={str(kind in ('qwen3', 'qwen3_moe')).lower()}"]
    if kind == "mixtral":
        out += ["moe.variant=topk", f"moe.num_experts={hf_cfg.num_local_experts}",
                f"moe.router_topk={hf_cfg.num_experts_per_tok}", "moe.router_pre_softmax=false", "moe.layer_freq=1",
                f"moe.ffn_hidden_size={hf_cfg.intermediate_size}"]
    if kind in ("qwen2_moe", "qwen3_moe"):
        dense = set(hf_cfg.mlp_only_layers or [])
        flags = [int(i not in dense and (i + 1) % hf_cfg.decoder_sparse_step == 0)
                 for i in range(hf_cfg.num_hidden_layers)]
        out += ["moe.variant=topk", f"moe.num_experts={hf_cfg.num_experts}",
                f"moe.router_topk={hf_cfg.num_experts_per_tok}",
                f"moe.router_pre_softmax={str(not hf_cfg.norm_topk_prob).lower()}",
                f"moe.layer_freq=[{','.join(map(str, flags))}]", f"moe.ffn_hidden_size={hf_cfg.moe_intermediate_size}"]
    if kind == "qwen2_moe":
        out += [f"moe.shared_expert_intermediate_size={hf_cfg.shared_expert_intermediate_size}",
                "moe.shared_expert_combine=gate"]
    return out


def _check_importable(hf_cfg) -> None:
    """UnsupportedExport naming the first feature of `hf_cfg` megatron-core's GPT layer cannot express."""
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    layer_types = set(getattr(hf_cfg, "layer_types", None) or ["full_attention"])
    checks = {"hidden_act": (hf_cfg.hidden_act, "silu", "the MLP's activation"),
              "rope_type": (rope.get("rope_type", "default"), "default", "rotary scaling"),
              "attention_bias": (getattr(hf_cfg, "attention_bias", False), False,
                                 "biases on the output projection too; megatron's add_qkv_bias covers q, k, v only"),
              "mlp_bias": (getattr(hf_cfg, "mlp_bias", False), False, "biases in the MLP"),
              "use_sliding_window": (getattr(hf_cfg, "use_sliding_window", False), False, "sliding-window attention"),
              "layer_types": (layer_types, {"full_attention"}, "attention other than full causal")}
    for key, (value, want, feature) in checks.items():
        if value != want:
            raise UnsupportedExport(f"{key}={value} ({feature}): megamoe's GPT needs {want}")
