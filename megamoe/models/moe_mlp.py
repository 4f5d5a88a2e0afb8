"""MoEMLP: the adapter that puts a megamoe MoE layer in megatron-core's TransformerLayer MLP slot.

megatron-core 0.16 builds the slot with `build_module(spec, config=...)` plus the spec's params, calls it on
[s, b, h] with `padding_mask` ([b, s], True = padding) and expects `(output, bias)`. This adapter is the only
[s, b, h] <-> [T, D] conversion (token t = s*b_size + b). Its signature also fits core >= 0.18's
MlpInterface. megatron counts any module other than its own MoELayer as a dense MLP (log line "Unknown MLP
type"); megamoe accepts that rather than subclassing megatron's MoELayer.
"""

from __future__ import annotations

from typing import Protocol

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megamoe.config import MoEConfig
from megamoe.moe import LayerShape, build_moe
from megamoe.moe.layer import Importance, TokenInfo
from megamoe.parallel.groups import ParallelGroups


class ImportanceSource(Protocol):
    """Where the block's attention leaves this micro-batch's token importance (a variant's megatron_spec hook
    installs one, e.g. DA-MoE's ImportanceCollector)."""

    def take(self) -> Importance | None: ...


class MoEMLP(MegatronModule):
    def __init__(self, config: TransformerConfig, submodules=None, layer_number: int | None = None,
                 pg_collection=None, is_mtp_layer: bool = False, name: str | None = None, *,
                 moe_cfg: MoEConfig, shape: LayerShape, groups: ParallelGroups,
                 importance: ImportanceSource | None = None) -> None:
        super().__init__(config)
        self.layer_number = shape.layer_number
        self.moe = build_moe(moe_cfg, shape, groups)
        self.groups, self.importance = groups, importance

    def set_layer_number(self, layer_number: int) -> None:
        """TransformerLayer calls this after construction (1-based, global)."""
        self.layer_number = layer_number

    def forward(self, hidden_states: Tensor, intermediate_tensors=None, padding_mask: Tensor | None = None,
                **kwargs) -> tuple[Tensor, None]:
        s, b, d = hidden_states.shape
        valid_T = None if padding_mask is None else ~padding_mask.transpose(0, 1).reshape(-1).bool()
        tokens = TokenInfo(valid_T=valid_T, sequence_T=torch.arange(s * b, device=hidden_states.device) % b,
                           num_sequences=b, importance=None if self.importance is None else self.importance.take(),
                           local=self._local_tokens(s * b))
        out_TD = self.moe(hidden_states.reshape(s * b, d), tokens)
        return out_TD.view(s, b, d), None


    def _local_tokens(self, num_local: int) -> tuple[int, int] | None:
        """Under sequence parallelism this rank holds rows [r*s/TP, (r+1)*s/TP) of the sequence: in token order
        (t = s*b + b) a contiguous range of the whole micro-batch's tokens."""
        if self.groups.sp_group is None:
            return None
        return self.groups.tp_rank * num_local, (self.groups.tp_rank + 1) * num_local


def moe_mlp_spec(moe_cfg: MoEConfig, shape: LayerShape, groups: ParallelGroups,
                 importance: ImportanceSource | None = None) -> ModuleSpec:
    return ModuleSpec(module=MoEMLP, params={"moe_cfg": moe_cfg, "shape": shape, "groups": groups,
                                             "importance": importance})
