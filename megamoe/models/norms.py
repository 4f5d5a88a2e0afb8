"""RMSNorm / LayerNorm for megatron-core layer specs, correct under sequence parallelism with any engine.

Under sequence parallelism each tensor-parallel rank normalises a different slice of the sequence, so the
norm weight's gradient is a partial sum. Megatron-LM all-reduces those gradients in finalize_model_grads;
megamoe trains through DeepSpeed, whose ZeRO hooks consume gradients as soon as they are produced. So the
sum is put in the autograd graph instead: the weight enters the forward through
`copy_to_tensor_model_parallel_region` (identity forward, all-reduce over TP backward), and every engine
sees the full gradient. Without sequence parallelism the inputs are replicated and nothing is reduced.

The fused NVIDIA apex kernels are used when apex is importable on a CUDA machine; torch's otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig


def _apex_norms():
    if not torch.cuda.is_available():
        return None, None
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
    except ImportError:
        return None, None
    return fused_layer_norm_affine, fused_rms_norm_affine


_APEX_LAYER_NORM, _APEX_RMS_NORM = _apex_norms()


class _Norm(torch.nn.Module):
    """Shared constructor: megatron builds norms with (config, hidden_size, eps)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        # Under sequence parallelism each TP rank normalises other tokens: its weight gradient is a partial sum.
        self.partial_grad = config.sequence_parallel and config.tensor_model_parallel_size > 1
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def _full_grad(self, param: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(param) if self.partial_grad else param


class RMSNorm(_Norm):
    """y = x / rms(x) * weight (Llama)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._full_grad(self.weight)
        if _APEX_RMS_NORM is not None and x.is_cuda:
            return _APEX_RMS_NORM(x, weight, (self.hidden_size,), self.eps)
        return F.rms_norm(x, (self.hidden_size,), weight, self.eps)


class LayerNorm(_Norm):
    """y = (x - mean) / std * weight + bias (GPT-2)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config, hidden_size, eps)
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._full_grad(self.weight), self._full_grad(self.bias)
        if _APEX_LAYER_NORM is not None and x.is_cuda:
            return _APEX_LAYER_NORM(x, weight, bias, (self.hidden_size,), self.eps)
        return F.layer_norm(x, (self.hidden_size,), weight, bias, self.eps)


NORMS = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}


class _HeadNorm:
    """A norm over each attention head (model.qk_layernorm). Every tensor-parallel rank holds other heads, so its
    weight gradient is a partial sum over TP whether or not the sequence is split (Megatron-LM all-reduces
    q_layernorm / k_layernorm gradients in finalize_model_grads; here the sum is in the graph, as above)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config, hidden_size, eps)
        self.partial_grad = config.tensor_model_parallel_size > 1


class HeadRMSNorm(_HeadNorm, RMSNorm):
    pass


class HeadLayerNorm(_HeadNorm, LayerNorm):
    pass


HEAD_NORMS = {"RMSNorm": HeadRMSNorm, "LayerNorm": HeadLayerNorm}
