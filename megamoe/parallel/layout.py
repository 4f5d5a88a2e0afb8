"""Pure layout arithmetic shared by the model builder and the planner (no process groups, no megatron)."""

from __future__ import annotations


def stage_layer_numbers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The global (1-based) numbers of the layers pipeline stage `pp_rank` holds: an equal, contiguous share."""
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage + 1, (pp_rank + 1) * per_stage + 1)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's rule: pad the embedding rows to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple
