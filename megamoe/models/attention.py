"""Self-attention's core (softmax(q k^T / sqrt(d)) v) through torch's scaled_dot_product_attention.

megatron-core's local layer spec computes it unfused: a [b * heads, s, s] score tensor from baddbmm, a masked
softmax, a bmm, each in memory (its fused kernels need TransformerEngine). torch's SDPA runs a flash-attention
kernel on a CPU and flash or memory-efficient kernels on a GPU: on this project's 2-core machine, forward and
backward at sequence 512 take 0.6x the unfused time. `model.attention_backend: unfused` keeps megatron's module.

Where SDPA cannot match megatron's module, that module runs: attention dropout while training (megatron draws
it from its tensor-parallel RNG tracker), an explicit mask on a bidirectional layer, query-key layer scaling,
window attention, a softmax offset. A causal layer ignores the mask it is given and masks causally, as
megatron's TransformerEngine backend does (megamoe's causal mask is that mask).

Shapes: query [sq, b, heads, hn], key and value [sk, b, groups, hn] (this tensor-parallel rank's heads); the
output [sq, b, heads * hn].
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor


class SdpaAttention(DotProductAttention):
    """megatron's DotProductAttention (same arguments, same state) computed by F.scaled_dot_product_attention."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        if not self._sdpa_computes(attention_mask, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        q_BHSD, k_BGSD, v_BGSD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out_BHSD = F.scaled_dot_product_attention(
            q_BHSD, k_BGSD, v_BGSD, is_causal=self.attn_mask_type == AttnMaskType.causal, scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        return out_BHSD.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)

    def _sdpa_computes(self, attention_mask: Tensor | None, attention_bias: Tensor | None, packed_seq_params) -> bool:
        """Whether SDPA gives what megatron's module would (else that module runs)."""
        dropout = self.attention_dropout.p > 0 and self.training
        mask_applies = attention_mask is not None and self.attn_mask_type != AttnMaskType.causal
        return not (dropout or mask_applies or attention_bias is not None or packed_seq_params is not None
                    or self.config.apply_query_key_layer_scaling or self.scale_mask_softmax.window_size is not None
                    or self.softmax_offset is not None)
