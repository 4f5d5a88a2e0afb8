"""DA-MoE's attention statistics: megatron's unfused attention core, also reporting token importance.

ImportanceAttention is megatron's DotProductAttention; a forward hook on its softmax reads the pre-dropout
probabilities [b, heads/TP, s, s], keeps only their column sums [b, s] (the attention each key receives),
sums them over the tensor-parallel heads, and hands the layer's MoE a normalised importance for every token of
the micro-batch through the layer's ImportanceCollector (the MoE adapter slices its own tokens under sequence
parallelism). Nothing larger than [b, s] outlives the hook.

Fused attention (FlashAttention, TransformerEngine/cuDNN) never materialises the probabilities. There the
column sums come from the log-sum-exp L_i the kernel returns, one key block at a time:
    received_j = sum_h sum_i allowed_ij * exp(scale * q_i . k_j - L_i)   (RoPE already applied to q and k)
an O(b h s^2 d) pass that needs no s x s buffer. megamoe's layer specs use the unfused core (as
megatron's local spec does), so that path is documented here, not implemented.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megamoe.variants.dynamic import DynamicMoEConfig
from megamoe.variants.dynamic.importance import Importance, column_sums, importance_from_columns


class ImportanceCollector:
    """One layer's hand-over from its attention to its MoE within a forward (put, then take once)."""

    def __init__(self, needed_in_eval: bool) -> None:
        self.needed_in_eval = needed_in_eval
        self._value: Importance | None = None

    def put(self, value: Importance) -> None:
        self._value = value

    def take(self) -> Importance | None:
        value, self._value = self._value, None
        return value


class ImportanceAttention(DotProductAttention):
    """megatron's DotProductAttention that also reports per-token importance to `collector`."""

    def __init__(self, *args, collector: ImportanceCollector, query_weight: str, normalize: str,
                 temperature: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.collector, self.query_weight = collector, query_weight
        self.normalize, self.temperature = normalize, temperature
        self.scale_mask_softmax.register_forward_hook(self._collect)

    @torch.no_grad()
    def _collect(self, module, inputs, probs_BHSS) -> None:
        if not (self.training or self.collector.needed_in_eval):
            return
        mask = inputs[1] if len(inputs) > 1 else None
        if mask is None and self.attn_mask_type.name == "causal":  # megatron built the causal mask itself
            seq = probs_BHSS.shape[-1]
            mask = torch.ones(seq, seq, dtype=torch.bool, device=probs_BHSS.device).triu(1)
        received_BS, queries_BS = column_sums(probs_BHSS, mask, self.query_weight)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if dist.get_world_size(tp_group) > 1:  # each TP rank holds heads / TP of them
            dist.all_reduce(received_BS, group=tp_group)
        self.collector.put(importance_from_columns(received_BS, queries_BS, self.config.num_attention_heads,
                                                   self.normalize, self.temperature))


def importance_attention(moe: DynamicMoEConfig, collector: ImportanceCollector):
    """The core-attention class for a DA-MoE layer (megatron instantiates it with its usual arguments).

    'predicted' trains toward the position-normalised target, optionally weighting queries by their key
    count (target_norm=uniform_relative); 'attention_received' uses the plain count."""
    query_weight = moe.target_norm if moe.importance_mode == "predicted" else "count"
    return functools.partial(ImportanceAttention, collector=collector, query_weight=query_weight,
                             normalize=moe.normalize, temperature=moe.softmax_temperature)


def layer_spec(spec, cfg) -> dict:
    """The DA-MoE hook on a block's megatron layer spec: its attention core also reports token importance, handed
    to the block's MoE layer through a collector (the MLP-slot adapter's `importance` argument)."""
    collector = ImportanceCollector(needed_in_eval=cfg.moe.importance_mode == "attention_received")
    spec.submodules.self_attention.submodules.core_attention = importance_attention(cfg.moe, collector)
    return {"importance": collector}
