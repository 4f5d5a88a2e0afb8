"""The implementations tools/bench_moe.py times: megamoe's layer, megatron-core's MoELayer, DeepSpeed's MoE,
and the expert-GEMM floor. Each builder returns a step (forward + backward, returns the output) that uses
the megamoe reference layer's weights, so every implementation routes every token alike.

Shapes: T tokens on this rank, D hidden, F expert width, E experts, e local experts, n rows of one expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megamoe.moe import LayerShape, MoELayer, build_moe
from megamoe.moe.routing import Routing
from megamoe.parallel.experts import ExpertPlacement
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.topk import TopKMoEConfig

AUX_LOSS_COEFF = 0.01  # every implementation pays for a Switch-style balancing loss, as in training
INIT_STD = 0.02


# ---- megamoe ----

def build_megamoe_layer(shape, groups: ParallelGroups, *, grouped_gemm: str, seed: int) -> MoELayer:
    cfg = TopKMoEConfig(num_experts=shape.num_experts, router_topk=shape.topk, ffn_hidden_size=shape.ffn_hidden_size,
                        aux_loss_coeff=AUX_LOSS_COEFF, grouped_gemm=grouped_gemm)
    layer_shape = LayerShape(hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size, swiglu=True,
                             init_std=INIT_STD, num_layers=1, layer_number=1, seed=seed)
    return build_moe(cfg, layer_shape, groups)


def megamoe_step(layer: torch.nn.Module, x_TD: Tensor, grad_TD: Tensor) -> Callable[[], Tensor]:
    def step() -> Tensor:
        layer.zero_grad(set_to_none=True)  # accumulating into old gradients would cost extra adds
        x_TD.grad = None
        out_TD = layer(x_TD)
        out_TD.backward(grad_TD)  # the attached aux loss gets its gradient through the pass-through
        return out_TD.detach()

    return step


def megamoe_grouped_step(reference: MoELayer, shape, groups: ParallelGroups, x_TD: Tensor,
                         grad_TD: Tensor, seed: int) -> Callable[[], Tensor]:
    layer = build_megamoe_layer(shape, groups, grouped_gemm="on", seed=seed)
    layer.load_state_dict(reference.state_dict())
    return megamoe_step(layer, x_TD, grad_TD)


# ---- megatron-core ----

def build_megatron_moe_layer(shape, ep_size: int) -> torch.nn.Module:
    """megatron-core's stock MoELayer: SequentialMLP experts, alltoall dispatcher, gated SwiGLU, no biases.

    Not models.megatron.to_transformer_config: that translates a RunConfig; this is megatron's own layer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        moe_ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=1, use_cpu_initialization=True,
        perform_initialization=False,  # the weights are copied from the megamoe layer
        params_dtype=torch.float32, add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0, num_moe_experts=shape.num_experts, moe_router_topk=shape.topk,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, moe_aux_loss_coeff=AUX_LOSS_COEFF,
        expert_model_parallel_size=ep_size)
    spec = get_gpt_layer_local_spec(num_experts=shape.num_experts, moe_grouped_gemm=False)
    return build_module(spec.submodules.mlp, config=cfg, layer_number=1)


def megatron_step(reference: MoELayer, shape, groups: ParallelGroups, x_TD: Tensor,
                  grad_TD: Tensor, seed: int) -> Callable[[], Tensor]:
    layer = build_megatron_moe_layer(shape, groups.ep_size)
    with torch.no_grad():
        layer.router.weight.copy_(reference.router.weight)
        for j, mlp in enumerate(layer.experts.local_experts):  # fc1 rows: gate, then up (as megamoe's)
            mlp.linear_fc1.weight.copy_(reference.experts.linear_fc1[j])
            mlp.linear_fc2.weight.copy_(reference.experts.linear_fc2[j])
    num_tokens, hidden = x_TD.shape

    def step() -> Tensor:
        layer.zero_grad(set_to_none=True)
        x_TD.grad = None
        out_SBD, _ = layer(x_TD.view(num_tokens, 1, hidden))  # megatron's [s, b, h]
        out_SBD.backward(grad_TD.view(num_tokens, 1, hidden))
        return out_SBD.detach().view(num_tokens, hidden)

    return step


# ---- DeepSpeed ----

class SwiGLUExpert(torch.nn.Module):
    """DeepSpeed deep-copies one expert module per local expert; this one matches megamoe's experts."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.linear_fc1 = torch.nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)
        self.linear_fc2 = torch.nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x_RD: Tensor) -> Tensor:
        gate_RF, up_RF = self.linear_fc1(x_RD).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate_RF) * up_RF)


def deepspeed_step(reference: MoELayer, shape, groups: ParallelGroups, x_TD: Tensor,
                   grad_TD: Tensor, seed: int) -> Callable[[], Tensor]:
    from megamoe.train.deepspeed import build_deepspeed_moe_layer  # loads DeepSpeed: only when asked for

    layer = build_deepspeed_moe_layer(shape.hidden_size, SwiGLUExpert(shape.hidden_size, shape.ffn_hidden_size),
                                      num_experts=shape.num_experts, topk=shape.topk, ep_size=groups.ep_size)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(reference.router.weight)
        for j, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            expert.linear_fc1.weight.copy_(reference.experts.linear_fc1[j])
            expert.linear_fc2.weight.copy_(reference.experts.linear_fc2[j])
    aux_grad = torch.tensor(AUX_LOSS_COEFF)

    def step() -> Tensor:
        layer.zero_grad(set_to_none=True)
        x_TD.grad = None
        out_TD, aux_loss, _ = layer(x_TD)
        torch.autograd.backward([out_TD, aux_loss], [grad_TD, aux_grad])  # DeepSpeed returns its aux loss
        return out_TD.detach()

    return step


STEP_BUILDERS: dict[str, Callable[..., Callable[[], Tensor]]] = {
    "megamoe-loop": lambda reference, shape, groups, x_TD, grad_TD, seed: megamoe_step(reference, x_TD, grad_TD),
    "megamoe-grouped": megamoe_grouped_step,
    "megatron-core": megatron_step,
    "deepspeed": deepspeed_step,
}


# ---- the expert-GEMM floor ----

def floor_steps(shape, routing: Routing, groups: ParallelGroups) -> dict[str, Callable[[], Tensor]]:
    """The floor at this routing's counts for this rank's experts, and at the balanced n = T*k/E."""
    counts_E = routing.tokens_per_expert()
    if groups.ep_group is not None:
        dist.all_reduce(counts_E, group=groups.ep_group)  # a rank's experts get rows from every rank
    placement = ExpertPlacement(shape.num_experts, groups)
    rows_e = counts_E[placement.experts_of(groups.ep_rank)].tolist()
    balanced = round(shape.num_tokens * shape.topk / shape.num_experts)
    return {"floor": floor_step(rows_e, shape), "floor-balanced": floor_step([balanced] * placement.num_local, shape)}


def floor_step(rows_e: list[int], shape) -> Callable[[], Tensor]:
    """fwd+bwd of exactly the expert GEMMs on plain tensors, no routing: per expert x[n, D] @ W1[D, 2F],
    SwiGLU, @ W2[F, D]; backward runs the two GEMMs (input and weight gradient) of each forward GEMM."""
    gen = torch.Generator().manual_seed(0)
    hidden, ffn = shape.hidden_size, shape.ffn_hidden_size
    x_nD = [torch.randn(n, hidden, generator=gen).requires_grad_() for n in rows_e]
    grad_nD = [torch.randn(n, hidden, generator=gen) for n in rows_e]
    w1_DF = [(INIT_STD * torch.randn(hidden, 2 * ffn, generator=gen)).requires_grad_() for _ in rows_e]
    w2_FD = [(INIT_STD * torch.randn(ffn, hidden, generator=gen)).requires_grad_() for _ in rows_e]
    leaves = x_nD + w1_DF + w2_FD

    def step() -> Tensor:
        for leaf in leaves:
            leaf.grad = None
        outs = []
        for x, w1, w2 in zip(x_nD, w1_DF, w2_FD, strict=True):
            gate_nF, up_nF = (x @ w1).chunk(2, dim=-1)
            outs.append((F.silu(gate_nF) * up_nF) @ w2)
        torch.autograd.backward(outs, grad_nD)  # one backward call: no per-expert engine start-up
        return outs[-1].detach()

    return step
