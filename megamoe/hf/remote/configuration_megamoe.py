"""The transformers config of an exported megamoe model (written by megamoe's tools/convert_checkpoint.py).

The backbone is Llama-shaped (RMSNorm, rotary positions, grouped-query attention, no biases); `moe` holds the
run's `moe:` section as megamoe resolved it (variant and every option) and `moe_layers` the 0-based blocks
whose MLP is a MoE layer.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MegamoeConfig(PretrainedConfig):
    model_type = "megamoe"

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 512, num_hidden_layers: int = 4,
                 num_attention_heads: int = 8, num_key_value_heads: int | None = None, head_dim: int | None = None,
                 intermediate_size: int = 2048, rms_norm_eps: float = 1e-5,
                 rope_theta: float = 10000.0, max_position_embeddings: int = 2048, initializer_range: float = 0.02,
                 is_causal: bool = True, moe: dict | None = None, moe_layers: list[int] | None = None,
                 tie_word_embeddings: bool = False, use_cache: bool = True, **kwargs) -> None:
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size, self.rms_norm_eps = intermediate_size, rms_norm_eps
        self.rope_theta, self.max_position_embeddings = rope_theta, max_position_embeddings
        self.initializer_range = initializer_range
        # is_causal False: a bidirectional encoder trained as a masked LM (load with AutoModelForMaskedLM).
        self.is_causal, self.use_cache = is_causal, use_cache
        self.moe = dict(moe or {})
        self.moe_layers = list(moe_layers or [])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
