"""build_model: a megatron-core GPTModel (Llama/Mixtral options) for a RunConfig: this rank's pipeline stage."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megamoe.config import RunConfig
from megamoe.models.megatron import decoder_block_spec, to_transformer_config
from megamoe.models.sharding import shard_tp
from megamoe.parallel.groups import ParallelGroups
from megamoe.parallel.layout import padded_vocab_size

# Weights outside the decoder layers, each initialised from its own stream (the layers seed themselves).
OUTSIDE_LAYERS = {"embedding.word_embeddings.weight": 1, "embedding.position_embeddings.weight": 2,
                  "output_layer.weight": 3}


def build_model(cfg: RunConfig, vocab_size: int, groups: ParallelGroups) -> GPTModel:
    """The GPT for this rank's tensor-, pipeline- and expert-parallel shard (the parallel groups must exist):
    the first stage holds the embedding, the last the final norm and output layer.

    `vocab_size` is the tokenizer's; the embedding is padded as Megatron pads it.
    """
    model = cfg.model
    gpt = GPTModel(
        config=to_transformer_config(cfg),
        transformer_layer_spec=decoder_block_spec(cfg, groups),
        vocab_size=padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by,
                                     cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings or cfg.data.seq_length,
        pre_process=groups.first_stage,
        post_process=groups.last_stage,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_base=model.rotary_base,
    )
    _init_outside_layers(gpt, cfg, groups)
    return gpt


@torch.no_grad()
def _init_outside_layers(gpt: GPTModel, cfg: RunConfig, groups: ParallelGroups) -> None:
    """N(0, init_method_std) for the embeddings and the output layer from (seed, tensor) streams: the same full
    tensors whichever stage holds them (megatron would draw them from the generator in construction order)."""
    params = dict(gpt.named_parameters())
    for name, stream in OUTSIDE_LAYERS.items():
        if name not in params:
            continue
        param = params[name]
        full_shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            full_shape[param.partition_dim] *= groups.tp_size
        gen = torch.Generator().manual_seed(cfg.train.seed * 7 + 104_729 * stream)
        full = torch.empty(full_shape).normal_(0.0, cfg.model.init_method_std, generator=gen)
        param.copy_(shard_tp(full, param, groups))
