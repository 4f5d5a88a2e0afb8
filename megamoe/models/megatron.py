"""The one place megamoe's config becomes megatron-core's: TransformerConfig and the layer specs.

Every layer comes from megatron-core's local (pure PyTorch) GPT layer spec with megamoe's norms; the MLP
slot is chosen per layer by `mlp_spec` — the dense megatron MLP here, MoE layers plug in there. Under
pipeline parallelism a stage gets the specs of its own layers only (megatron numbers them globally).
Each layer initialises from its own random stream (`SeededTransformerLayer`), so a layer's initial weights
do not depend on which stage builds it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megamoe import variants
from megamoe.config import RunConfig
from megamoe.config.validate import moe_layer_numbers
from megamoe.models.attention import SdpaAttention
from megamoe.models.moe_mlp import moe_mlp_spec
from megamoe.models.norms import HEAD_NORMS, NORMS
from megamoe.moe import LayerShape
from megamoe.parallel.groups import ParallelGroups
from megamoe.parallel.layout import stage_layer_numbers

SAME_NAMED = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "normalization",
              "add_bias_linear", "add_qkv_bias", "qk_layernorm", "init_method_std", "hidden_dropout",
              "attention_dropout")
"""The model settings megatron-core's TransformerConfig takes under megamoe's own names."""


def to_transformer_config(cfg: RunConfig) -> TransformerConfig:
    """megatron-core's TransformerConfig for `cfg` (parameters created in fp32; DeepSpeed casts for bf16)."""
    model, par = cfg.model, cfg.parallel
    tp = par.tensor_model_parallel_size
    return TransformerConfig(
        **{name: getattr(model, name) for name in SAME_NAMED},
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel and tp > 1,
        bf16=cfg.train.bf16,
        fp16=cfg.train.fp16,
        params_dtype=torch.float32,
        # The dtype of the hidden states crossing pipeline stages (megatron requires it with PP > 1).
        pipeline_dtype=torch.bfloat16 if cfg.train.bf16 else torch.float32,
        # Initialise each full weight on the CPU and keep this rank's shard: the model is then the same
        # for every TP size (TP runs compare exactly with TP=1). Required without CUDA anyway.
        use_cpu_initialization=True,
        # The fused kernels come from TransformerEngine/apex builds megamoe does not require.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def mlp_spec(cfg: RunConfig, layer_number: int, dense_mlp: ModuleSpec, groups: ParallelGroups,
             **moe_params) -> ModuleSpec:
    """The module in layer `layer_number`'s MLP slot (1-based, global): MoE where moe.layer_freq says."""
    if layer_number not in moe_layer_numbers(cfg.moe, cfg.model.num_layers):
        return dense_mlp
    model = cfg.model
    shape = LayerShape(hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
                       swiglu=model.swiglu, init_std=model.init_method_std, num_layers=model.num_layers,
                       layer_number=layer_number, seed=cfg.train.seed, norm_epsilon=model.norm_epsilon)
    return moe_mlp_spec(cfg.moe, shape, groups, **moe_params)


class SeededTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer, initialised from a random stream of its own: (seed, global layer number).

    megatron initialises on the CPU from the default generator in construction order, so without this a
    layer's weights would depend on how many layers (and embeddings) its pipeline stage built before it.
    """

    def __init__(self, *args, init_seed: int, global_layer_number: int, **kwargs) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed + 1_000_033 * global_layer_number)
            super().__init__(*args, **kwargs)


def decoder_block_spec(cfg: RunConfig, groups: ParallelGroups) -> TransformerBlockSubmodules:
    """One layer spec per decoder layer of this pipeline stage: megatron's local GPT layer, megamoe's norms, a
    per-layer MLP.

    masked_lm makes self-attention bidirectional (padding mask only). In a block holding an MoE layer, its variant
    may change the rest of the block (megamoe.variants: owns_pre_mlp_norm, megatron_spec).
    """
    norm = NORMS[cfg.model.normalization]
    base = get_gpt_layer_local_spec(normalization=cfg.model.normalization, qk_layernorm=cfg.model.qk_layernorm)
    moe_layers = moe_layer_numbers(cfg.moe, cfg.model.num_layers)
    layers = []
    for layer_number in stage_layer_numbers(cfg.model.num_layers, groups.pp_size, groups.pp_rank):
        spec = copy.deepcopy(base)
        spec.module = SeededTransformerLayer
        spec.params = {**spec.params, "init_seed": cfg.train.seed, "global_layer_number": layer_number}
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
        if cfg.model.qk_layernorm:
            attention = spec.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = HEAD_NORMS[cfg.model.normalization]
        if cfg.model.objective == "masked_lm":
            spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.padding
        if cfg.model.attention_backend == "sdpa":
            spec.submodules.self_attention.submodules.core_attention = SdpaAttention
        moe_params = {}
        if layer_number in moe_layers:
            variant = variants.of(cfg.moe)
            if variant.owns_pre_mlp_norm:
                spec.submodules.pre_mlp_layernorm = IdentityOp  # the layer normalises its own inputs
            if variant.megatron_spec is not None:
                moe_params = variants.resolve(variant.megatron_spec)(spec, cfg)
        spec.submodules.mlp = mlp_spec(cfg, layer_number, base.submodules.mlp, groups, **moe_params)
        layers.append(spec)
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm)
