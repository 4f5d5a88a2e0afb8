"""The routing contract, top-k routers, capacity dropping and the auxiliary losses (plain PyTorch)."""

from __future__ import annotations

import pytest
import torch

from megamoe.moe.losses import (
    attach_aux_loss,
    sequence_balance_loss,
    set_aux_loss_scale,
    switch_balance_loss,
    z_loss,
)
from megamoe.moe.routing import Routing, apply_capacity, expert_capacity, routing_from_topk, topk_route


def _routing(token, expert, weight, num_tokens, num_experts, probs=None, valid=None) -> Routing:
    return Routing(token_N=torch.tensor(token), expert_N=torch.tensor(expert),
                   weight_N=torch.tensor(weight, dtype=torch.float32), probs_TE=probs, logits_TE=None,
                   valid_T=valid, num_tokens=num_tokens, num_experts=num_experts)


def test_switch_top1_keeps_the_raw_probability():
    logits_TE = torch.randn(6, 4)
    routing = topk_route(logits_TE, k=1, pre_softmax=True)
    probs_TE = logits_TE.softmax(-1)
    torch.testing.assert_close(routing.weight_N, probs_TE.max(-1).values)
    assert routing.expert_N.tolist() == probs_TE.argmax(-1).tolist()


def test_mixtral_top2_is_renormalised_gshard():
    logits_TE = torch.randn(10, 8)
    routing = topk_route(logits_TE, k=2, pre_softmax=False)
    top_TK = logits_TE.softmax(-1).topk(2, dim=-1)
    renorm_TK = top_TK.values / top_TK.values.sum(-1, keepdim=True)
    expected = torch.zeros(10, 8).scatter(1, top_TK.indices, renorm_TK)
    torch.testing.assert_close(routing.combine_weights(), expected)
    assert torch.allclose(routing.combine_weights().sum(-1), torch.ones(10))  # C1: rows sum to 1


def test_contract_order_map_and_counts():
    routing = topk_route(torch.randn(7, 5), k=3, pre_softmax=False)
    tokens, experts = routing.token_N.tolist(), routing.expert_N.tolist()
    assert list(zip(tokens, experts, strict=True)) == sorted(zip(tokens, experts, strict=True))  # token, expert order
    map_TE = routing.routing_map()
    assert map_TE.nonzero().tolist() == [[t, e] for t, e in zip(tokens, experts, strict=True)]  # C2 round trip
    assert (routing.combine_weights()[~map_TE] == 0).all()  # C1: exactly 0 off the map
    assert routing.copies_per_token().tolist() == map_TE.sum(1).tolist() == [3] * 7


def test_pads_get_no_copies_and_no_statistics():
    logits_TE = torch.randn(6, 4)
    valid_T = torch.tensor([True, True, False, True, False, True])
    routing = topk_route(logits_TE, k=2, pre_softmax=False, valid_T=valid_T)
    assert routing.copies_per_token().tolist() == [2, 2, 0, 2, 0, 2]
    unpadded = topk_route(logits_TE[valid_T], k=2, pre_softmax=False)
    torch.testing.assert_close(switch_balance_loss(routing), switch_balance_loss(unpadded))  # C10


def test_expert_bias_shifts_selection_not_weights():
    logits_TE = torch.tensor([[2.0, 1.0, 0.0]])
    bias_E = torch.tensor([0.0, 0.0, 5.0])
    routing = topk_route(logits_TE, k=1, pre_softmax=True, expert_bias_E=bias_E)
    assert routing.expert_N.tolist() == [2]
    torch.testing.assert_close(routing.weight_N, logits_TE.softmax(-1)[:, 2])


def test_capacity_drops_exactly_the_expected_copies():
    # Expert 0 is wanted by tokens 0, 1, 2 (probabilities 0.2, 0.9, 0.5); capacity 2.
    probs_TE = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    routing = _routing([0, 1, 2, 2], [0, 0, 0, 1], [0.2, 0.9, 0.5, 0.5], 3, 2, probs=probs_TE)
    by_probs, dropped = apply_capacity(routing, capacity=2, policy="probs")
    assert list(zip(by_probs.token_N.tolist(), by_probs.expert_N.tolist(), strict=True)) == [(1, 0), (2, 0), (2, 1)]
    assert int(dropped) == 1
    by_position, dropped = apply_capacity(routing, capacity=2, policy="position")
    assert list(zip(by_position.token_N.tolist(), by_position.expert_N.tolist(), strict=True)) == [(0, 0), (1, 0),
                                                                                                   (2, 1)]
    assert int(dropped) == 1
    assert expert_capacity(num_copies=8, num_experts=4, capacity_factor=1.25) == 3


def test_uniform_routing_gives_switch_loss_one():
    probs_TE = torch.full((8, 4), 0.25)
    routing = routing_from_topk(torch.arange(8).remainder(4)[:, None], torch.ones(8, 1), 4, probs_TE)
    assert switch_balance_loss(routing).item() == pytest.approx(1.0)  # C6: coeff x loss = coeff


def test_switch_loss_equals_megatron_for_fixed_k():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    logits_TE = torch.randn(16, 8)
    routing = topk_route(logits_TE, k=2, pre_softmax=False)
    theirs = switch_load_balancing_loss_func(routing.probs_TE, routing.tokens_per_expert(), total_num_tokens=16,
                                             topk=2, num_experts=8, moe_aux_loss_coeff=1.0)
    torch.testing.assert_close(switch_balance_loss(routing), theirs)


def test_z_loss_equals_megatron():
    from megatron.core.transformer.moe.moe_utils import z_loss_func

    logits_TE = torch.randn(12, 6)
    routing = topk_route(logits_TE, k=2, pre_softmax=False)
    torch.testing.assert_close(z_loss(routing), z_loss_func(logits_TE, 1.0))


def test_sequence_loss_is_the_mean_of_per_sequence_losses():
    logits_TE = torch.randn(12, 4)
    sequence_T = torch.arange(12) % 3  # [s, b] order: token t belongs to sequence t % B
    routing = topk_route(logits_TE, k=2, pre_softmax=False)
    per_sequence = [switch_balance_loss(topk_route(logits_TE[sequence_T == b], k=2, pre_softmax=False))
                    for b in range(3)]
    torch.testing.assert_close(sequence_balance_loss(routing, sequence_T, 3), torch.stack(per_sequence).mean())


def test_attached_aux_loss_gradient_equals_adding_it_to_the_loss():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)

    def forward():
        return x * 2.0, (x.sum(0) * w).square().sum() * 0.1

    set_aux_loss_scale(0.5)  # e.g. 2 accumulation steps
    try:
        out, aux = forward()
        attached = attach_aux_loss(out, aux)
        assert torch.equal(attached, out)  # C5: forward unchanged
        (attached.sum() * 0.5).backward()
        got = (x.grad.clone(), w.grad.clone())
        x.grad, w.grad = None, None
        out, aux = forward()
        ((out.sum() + aux) * 0.5).backward()
    finally:
        set_aux_loss_scale(1.0)
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], w.grad)
