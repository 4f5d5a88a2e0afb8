"""megamoe models in transformers: a Llama-shaped backbone (megatron-core's GPT with RMSNorm, rotary positions,
grouped-query attention, SwiGLU, no biases) whose blocks hold a dense MLP or a megamoe MoE layer
(moe_megamoe.py). MegamoeForCausalLM generates with a KV cache; MegamoeForMaskedLM is the bidirectional encoder
(DA-MoE's faithful mode). Load with `trust_remote_code=True`.

Shapes: B sequences, S positions of this forward, P cached + new positions, H query heads, G key/value heads,
Dh head dim, D hidden, T = B*S tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput

from .configuration_megamoe import MegamoeConfig
from .moe_megamoe import QueryBatchNorm, RMSNorm, Tokens, attention_importance, build_moe

# transformers renamed the cache argument and output field (past_key_values -> cache) within 5.x: use both.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class RotaryEmbedding(nn.Module):
    """megatron's (and Llama's) non-interleaved RoPE over the whole head dimension."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def forward(self, position_BS: Tensor) -> tuple[Tensor, Tensor]:
        freqs_BSF = position_BS.float()[..., None] * self.inv_freq.to(position_BS.device)
        emb = torch.cat([freqs_BSF, freqs_BSF], dim=-1)[:, None]  # [B, 1, S, Dh]
        return emb.cos(), emb.sin()


class MegamoeAttention(nn.Module):
    def __init__(self, config: MegamoeConfig, layer_idx: int, importance: bool) -> None:
        super().__init__()
        self.layer_idx, self.importance = layer_idx, importance
        self.num_heads, self.num_groups, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                          config.head_dim)
        d, heads, groups = config.hidden_size, self.num_heads, self.num_groups
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor], allowed_BSP: Tensor,
                cache) -> tuple[Tensor, Tensor | None]:
        """Output [B, S, D] and, for a DA-MoE layer, the importance of each token [T] (from the probabilities)."""
        b, s, _ = x_BSD.shape
        q, k, v = (proj(x_BSD).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rope
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        repeat = self.num_heads // self.num_groups  # query head h reads key/value group h // repeat
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        # Disallowed scores get the dtype's minimum (not -inf): a fully masked pad row stays finite, as in megatron.
        bias_B1SP = torch.zeros(allowed_BSP.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~allowed_BSP, torch.finfo(q.dtype).min)[:, None]
        importance_T = None
        if self.importance is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_B1SP)
        else:
            probs_BHSP = ((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5 + bias_B1SP).float().softmax(dim=-1)
            out = probs_BHSP.to(v.dtype) @ v
            importance_T = attention_importance(probs_BHSP, allowed_BSP, *self.importance)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), importance_T


class MegamoeMLP(nn.Module):
    """A dense block's SwiGLU MLP (Llama names): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MegamoeConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x_TD: Tensor, tokens: Tokens) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))


class MegamoeDecoderLayer(nn.Module):
    def __init__(self, config: MegamoeConfig, layer_idx: int) -> None:
        super().__init__()
        moe = config.moe if layer_idx in config.moe_layers else None
        importance = None
        if moe is not None and moe["variant"] == "dynamic" and moe["importance_mode"] == "attention_received":
            importance = (moe["normalize"], moe["softmax_temperature"])
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MegamoeAttention(config, layer_idx, importance)
        # CartesianMoE normalises each sub-layer's input itself: the block's pre-MLP norm is the identity.
        self.post_attention_layernorm = nn.Identity() if moe is not None and moe["variant"] == "cartesian" else \
            RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MegamoeMLP(config) if moe is None else build_moe(moe, config.hidden_size, config.rms_norm_eps)

    def forward(self, x_BSD: Tensor, rope, allowed_BSP: Tensor, valid_T: Tensor, cache) -> Tensor:
        b, s, d = x_BSD.shape
        attn_BSD, importance_T = self.self_attn(self.input_layernorm(x_BSD), rope, allowed_BSP, cache)
        h_BSD = x_BSD + attn_BSD
        tokens = Tokens(valid_T=valid_T, num_sequences=b, importance_T=importance_T)
        return h_BSD + self.mlp(self.post_attention_layernorm(h_BSD).reshape(b * s, d), tokens).view(b, s, d)


class MegamoePreTrainedModel(PreTrainedModel):
    config_class = MegamoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["MegamoeDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights (only for a model built from its config alone; from_pretrained loads every tensor)."""
        std = self.config.initializer_range
        if isinstance(module, RotaryEmbedding):  # not saved: transformers leaves it empty after loading
            module.inv_freq.copy_(module.frequencies())
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, (RMSNorm, nn.LayerNorm, QueryBatchNorm)):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                param.zero_()
            else:
                param.normal_(0.0, std)


class MegamoeModel(MegamoePreTrainedModel):
    def __init__(self, config: MegamoeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MegamoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, past_key_values=None, **kwargs) -> BaseModelOutputWithPast:
        x_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = x_BSD.shape
        cache = cache if cache is not None else past_key_values
        causal = self.config.is_causal
        if causal and cache is None and (use_cache if use_cache is not None else self.config.use_cache):
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(s, device=x_BSD.device))[None].expand(b, s)
        key_valid_BP = torch.ones(b, past + s, dtype=torch.bool, device=x_BSD.device) if attention_mask is None \
            else attention_mask[:, -(past + s):].bool()
        allowed_BSP = key_valid_BP[:, None, :].expand(b, s, past + s)
        if causal:
            query_pos = past + torch.arange(s, device=x_BSD.device)
            key_pos = torch.arange(past + s, device=x_BSD.device)
            allowed_BSP = allowed_BSP & (key_pos[None, :] <= query_pos[:, None])
        else:  # an encoder: padding queries see nothing (as megatron's padding mask)
            allowed_BSP = allowed_BSP & key_valid_BP[:, -s:, None]
        valid_T = key_valid_BP[:, -s:].reshape(-1)
        # Computed in fp32, applied in the activations' dtype (as megatron's apply_rotary_pos_emb does).
        rope = tuple(t.to(x_BSD.dtype) for t in self.rotary_emb(position_ids))
        for layer in self.layers:
            x_BSD = layer(x_BSD, rope, allowed_BSP, valid_T, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x_BSD), **{_CACHE_FIELD: cache})


class MegamoeWithLMHead(MegamoePreTrainedModel):
    """The model and its output projection (tied to the embedding when the config says so)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MegamoeConfig) -> None:
        super().__init__(config)
        self.model = MegamoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


class MegamoeForCausalLM(MegamoeWithLMHead, GenerationMixin):
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, past_key_values=None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids, attention_mask, position_ids, cache if cache is not None else past_key_values,
                         inputs_embeds, use_cache)
        hidden = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:  # next-token prediction; -100 ignored
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


class MegamoeForMaskedLM(MegamoeWithLMHead):
    """The bidirectional encoder: logits for every position (a masked LM predicts the <mask> ones)."""

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, **kwargs) -> MaskedLMOutput:
        hidden = self.model(input_ids, attention_mask, position_ids, None, inputs_embeds, False).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
