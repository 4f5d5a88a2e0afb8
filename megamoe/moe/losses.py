"""Auxiliary losses as pure functions of a Routing, and the pass-through that attaches them.

Shapes: T tokens, E experts, N routed copies, B sequences. Losses are normalised by the realised number of
copies N (not T*k), so they stay right when k varies per token; pads are excluded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megamoe.moe.routing import Routing


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
    gradient (variants.md §1.4).
    """
    if not aux.requires_grad:
        return out
    return _AttachAuxLoss.apply(out, aux)


def _valid_mean_probs(routing: Routing) -> Tensor:
    probs_TE = routing.probs_TE
    if routing.valid_T is None:
        return probs_TE.mean(dim=0)
    valid_T = routing.valid_T.to(probs_TE.dtype)
    return (probs_TE * valid_T[:, None]).sum(dim=0) / valid_T.sum().clamp(min=1.0)


def switch_balance_loss(routing: Routing) -> Tensor:
    """Switch Transformer balancing loss (arXiv:2101.03961 eq. 4): E * sum_e f_e * P_e, with f_e the share
    of this micro-batch's copies that go to expert e and P_e the mean router probability of e.
    Uniform routing gives exactly 1."""
    share_E = routing.tokens_per_expert().to(routing.probs_TE.dtype) / max(routing.expert_N.numel(), 1)
    return routing.num_experts * (share_E * _valid_mean_probs(routing)).sum()


def global_balance_loss(routing: Routing, global_share_E: Tensor) -> Tensor:
    """The Switch loss with f_e taken over the global batch (all ranks, the step's micro-batches so far)."""
    return routing.num_experts * (global_share_E * _valid_mean_probs(routing)).sum()


def sequence_balance_loss(routing: Routing, sequence_T: Tensor, num_sequences: int) -> Tensor:
    """The Switch loss computed per sequence and averaged over sequences (DeepSeek-V2's sequence-wise loss)."""
    num_experts, probs_TE = routing.num_experts, routing.probs_TE
    valid_T = (torch.ones_like(sequence_T, dtype=probs_TE.dtype) if routing.valid_T is None
               else routing.valid_T.to(probs_TE.dtype))
    copies_BE = torch.zeros(num_sequences, num_experts, dtype=probs_TE.dtype, device=probs_TE.device)
    copies_BE.index_put_((sequence_T[routing.token_N], routing.expert_N),
                         torch.ones_like(routing.weight_N, dtype=probs_TE.dtype), accumulate=True)
    share_BE = copies_BE / copies_BE.sum(dim=1, keepdim=True).clamp(min=1.0)
    prob_sum_BE = torch.zeros_like(copies_BE).index_add_(0, sequence_T, probs_TE * valid_T[:, None])
    tokens_B = torch.zeros(num_sequences, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(
        0, sequence_T, valid_T)
    mean_prob_BE = prob_sum_BE / tokens_B.clamp(min=1.0)[:, None]
    has_tokens_B = (tokens_B > 0).to(probs_TE.dtype)
    per_sequence_B = num_experts * (share_BE * mean_prob_BE).sum(dim=1)
    return (per_sequence_B * has_tokens_B).sum() / has_tokens_B.sum().clamp(min=1.0)


def z_loss(routing: Routing) -> Tensor:
    """Router z-loss (ST-MoE, arXiv:2202.08906): mean over valid tokens of logsumexp(logits)^2."""
    lse_T = routing.logits_TE.logsumexp(dim=-1).square()
    if routing.valid_T is None:
        return lse_T.mean()
    valid_T = routing.valid_T.to(lse_T.dtype)
    return (lse_T * valid_T).sum() / valid_T.sum().clamp(min=1.0)
