"""build_model: a megatron-core GPTModel (Llama/Mixtral options) for a RunConfig."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from megamoe.config import RunConfig
from megamoe.models.megatron import decoder_block_spec, padded_vocab_size, to_transformer_config
from megamoe.parallel.groups import ParallelGroups


def build_model(cfg: RunConfig, vocab_size: int, groups: ParallelGroups) -> GPTModel:
    """The GPT for this rank's tensor- and expert-parallel shard (the parallel groups must exist).

    `vocab_size` is the tokenizer's; the embedding is padded as Megatron pads it.
    """
    model = cfg.model
    return GPTModel(
        config=to_transformer_config(cfg),
        transformer_layer_spec=decoder_block_spec(cfg, groups),
        vocab_size=padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by,
                                     cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings or cfg.data.seq_length,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_base=model.rotary_base,
    )
