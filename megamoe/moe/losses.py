"""Auxiliary losses as functions of a Routing, and the pass-through that attaches them.

Shapes: T tokens, E experts, N routed copies, B sequences. Losses are normalised by the realised number of
copies N (not T*k), so they stay right when k varies per token; pads are excluded.

`group`: the ranks this micro-batch's tokens are split over (the tensor-parallel group under sequence
parallelism; None otherwise). Routing counts are summed over it and probabilities normalised by its total
token count, so each rank's loss is its additive share of the loss of the whole micro-batch: with the router
gradient summed over the group (as sequence parallelism does), the result equals the unsplit computation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megamoe.moe.routing import Routing
from megamoe.parallel.comm import all_reduce_sum


class AuxLossScale:
    """The gradient every attached aux loss receives: 1 / gradient-accumulation steps (the engine divides
    the LM loss by it), times the fp16 loss scale. Set by the trainer before each backward."""

    value: float = 1.0


def set_aux_loss_scale(value: float) -> None:
    AuxLossScale.value = float(value)


class _AttachAuxLoss(torch.autograd.Function):
    """Forward: `out` unchanged. Backward: `out`'s gradient passes through and `aux` gets AuxLossScale.value."""

    @staticmethod
    def forward(ctx, out: Tensor, aux: Tensor) -> Tensor:
        ctx.save_for_backward(aux)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (aux,) = ctx.saved_tensors
        return grad_out, torch.full_like(aux, AuxLossScale.value)


def attach_aux_loss(out: Tensor, aux: Tensor) -> Tensor:
    """Make `aux` (a scalar already multiplied by its coefficient) part of the loss without changing `out`.

    Attached to the layer output, so a micro-batch whose tokens all have 0 experts still delivers the aux
    gradient (docs/variants.md §1.4).
    """
    if not aux.requires_grad:
        return out
    return _AttachAuxLoss.apply(out, aux)


def _valid_T(routing: Routing) -> Tensor:
    if routing.valid_T is None:
        return torch.ones(routing.num_tokens, device=routing.token_N.device)
    return routing.valid_T.float()


def _probs_share(routing: Routing, group) -> Tensor:
    """sum over this rank's valid tokens of p[t, e], divided by the valid tokens of the whole group."""
    valid_T = _valid_T(routing)
    total = all_reduce_sum(valid_T.sum(), group).clamp(min=1.0)
    return (routing.probs_TE * valid_T[:, None]).sum(dim=0) / total


def switch_balance_loss(routing: Routing, group=None) -> Tensor:
    """Switch Transformer balancing loss (arXiv:2101.03961 eq. 4): E * sum_e f_e * P_e, with f_e the share
    of the micro-batch's copies that go to expert e and P_e the mean router probability of e.
    Uniform routing gives exactly 1."""
    counts_E = all_reduce_sum(routing.tokens_per_expert().float(), group)
    share_E = counts_E / counts_E.sum().clamp(min=1.0)
    return routing.num_experts * (share_E * _probs_share(routing, group)).sum()


def global_balance_loss(routing: Routing, global_share_E: Tensor, group=None) -> Tensor:
    """The Switch loss with f_e taken over the global batch (all ranks, the step's micro-batches so far)."""
    return routing.num_experts * (global_share_E * _probs_share(routing, group)).sum()


def sequence_balance_loss(routing: Routing, sequence_T: Tensor, num_sequences: int, group=None) -> Tensor:
    """The Switch loss computed per sequence and averaged over sequences (DeepSeek-V2's sequence-wise loss)."""
    num_experts, probs_TE = routing.num_experts, routing.probs_TE
    valid_T = _valid_T(routing)
    copies_BE = torch.zeros(num_sequences, num_experts, device=probs_TE.device)
    copies_BE.index_put_((sequence_T[routing.token_N], routing.expert_N),
                         torch.ones_like(routing.weight_N, dtype=copies_BE.dtype), accumulate=True)
    copies_BE = all_reduce_sum(copies_BE, group)
    share_BE = copies_BE / copies_BE.sum(dim=1, keepdim=True).clamp(min=1.0)
    tokens_B = all_reduce_sum(torch.zeros(num_sequences, device=probs_TE.device).index_add_(0, sequence_T, valid_T),
                              group)
    prob_sum_BE = torch.zeros_like(copies_BE).index_add(0, sequence_T, probs_TE * valid_T[:, None])
    mean_prob_BE = prob_sum_BE / tokens_B.clamp(min=1.0)[:, None]
    has_tokens_B = (tokens_B > 0).float()
    per_sequence_B = num_experts * (share_BE * mean_prob_BE).sum(dim=1)
    return (per_sequence_B * has_tokens_B).sum() / has_tokens_B.sum().clamp(min=1.0)


def z_loss(routing: Routing, group=None) -> Tensor:
    """Router z-loss (ST-MoE, arXiv:2202.08906): mean over valid tokens of logsumexp(logits)^2."""
    valid_T = _valid_T(routing)
    total = all_reduce_sum(valid_T.sum(), group).clamp(min=1.0)
    return (routing.logits_TE.logsumexp(dim=-1).square() * valid_T).sum() / total
