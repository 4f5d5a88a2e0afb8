"""DA-MoE: importance from attention, experts per token, budgets, routing with a per-token K (plain PyTorch)."""

from __future__ import annotations

import pytest
import torch

from megamoe.moe import LayerShape, build_moe
from megamoe.moe.layer import TokenInfo
from megamoe.moe.routing import topk_route, variable_topk_route
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.dynamic import DynamicMoEConfig
from megamoe.variants.dynamic.importance import (
    Importance,
    budget_experts,
    column_sums,
    experts_per_token,
    importance_from_columns,
    running_experts,
)


def test_importance_equals_the_hand_computation():
    """Two sequences of 4, heads 2; sequence 1's last token is padding (masked as key and as query)."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, seq = 2, 2, 4
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    mask_BSS = ~(valid[:, :, None] & valid[:, None, :])  # True = masked
    scores = torch.randn(batch, heads, seq, seq, generator=gen).masked_fill(mask_BSS[:, None], -1e4)
    probs = scores.softmax(-1)
    received, queries = column_sums(probs, mask_BSS)
    importance = importance_from_columns(received, queries, num_heads=heads)
    for b in range(batch):
        keys = [j for j in range(seq) if valid[b, j]]
        raw = {j: sum(probs[b, h, i, j] for h in range(heads) for i in keys) / heads / len(keys) for j in keys}
        top = max(raw.values())
        for s in range(seq):
            want = raw[s] / top if s in raw else 0.0
            assert importance.score_T[s * batch + b].item() == pytest.approx(float(want), rel=1e-6)  # t = s*B + b
    assert importance.valid_T.tolist() == [True, True, True, True, True, True, True, False]


def test_causal_queries_count_is_positions_to_the_end():
    seq = 6
    causal = torch.ones(1, seq, seq, dtype=torch.bool).triu(1)
    probs = torch.full((1, 1, seq, seq), 0.0).masked_fill(~causal[:, None], 1.0)
    probs = probs / probs.sum(-1, keepdim=True)  # uniform causal attention
    _, queries = column_sums(probs, causal)
    assert queries[0].tolist() == [6, 5, 4, 3, 2, 1]  # n_j = S - j
    received, queries = column_sums(probs, causal, query_weight="uniform_relative")
    assert torch.allclose(received / queries, torch.ones(seq))  # exactly 1 under uniform attention (D5)


def test_the_papers_example():
    """Importance 0.3 for 'The movie was', 0.7 for 'incredibly inspiring' (docs/variants.md §3.6)."""
    s = torch.tensor([0.3, 0.3, 0.3, 0.7, 0.7])
    valid = torch.ones(5, dtype=torch.bool)
    assert experts_per_token(s, valid, k_min=1, k_max=4).tolist() == [2, 2, 2, 3, 3]
    assert experts_per_token(s, valid, k_min=1, k_max=8).tolist() == [3, 3, 3, 6, 6]
    assert experts_per_token(s / 0.7, valid, k_min=1, k_max=4).tolist() == [2, 2, 2, 4, 4]
    assert budget_experts(s, valid, 1, k_min=1, k_max=4, k_mean=2.0).tolist() == [2, 1, 1, 3, 3]
    assert experts_per_token(torch.tensor([0.25]), None, k_min=1, k_max=4).tolist() == [1]


def test_k_bounds_monotone_and_budgets():
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(200, generator=gen)
    valid = torch.rand(200, generator=gen) > 0.1
    for k_min, k_max in ((0, 3), (1, 4), (2, 2)):
        k = experts_per_token(s, valid, k_min, k_max)
        assert (k[valid] >= k_min).all() and (k[valid] <= k_max).all() and (k[~valid] == 0).all()
        order = s[valid].argsort()
        assert (k[valid][order].diff() >= 0).all(), "K must grow with importance"
        exact = budget_experts(s, valid, 4, k_min, k_max, k_mean=(k_min + k_max) / 2)
        assert int(exact.sum()) == round((k_min + k_max) / 2 * int(valid.sum()))  # sum K = round(k_mean T_v)
        assert (exact[valid] >= k_min).all() and (exact[valid] <= k_max).all() and (exact[~valid] == 0).all()
    assert running_experts(torch.tensor([0.5, 0.5]), None, scale=4.0, k_min=1, k_max=4).tolist() == [2, 2]


def test_constant_k_reproduces_switch_and_mixtral_bit_exactly():
    logits = torch.randn(12, 8)
    for k, pre_softmax in ((1, True), (2, False), (3, False)):
        variable = variable_topk_route(logits, torch.full((12,), k), k_max=4, renormalize="k>1")
        fixed = topk_route(logits, k, pre_softmax=pre_softmax)
        assert torch.equal(variable.token_N, fixed.token_N) and torch.equal(variable.expert_N, fixed.expert_N)
        assert torch.equal(variable.weight_N, fixed.weight_N)


def test_tokens_with_zero_experts_route_nowhere():
    routing = variable_topk_route(torch.randn(4, 6), torch.tensor([0, 3, 1, 0]), k_max=3, renormalize="k>1")
    assert routing.copies_per_token().tolist() == [0, 3, 1, 0]


def _layer(**moe):
    cfg = DynamicMoEConfig(**{"num_experts": 6, "k_max": 4, "aux_loss_coeff": 0.01, **moe})
    shape = LayerShape(hidden_size=8, ffn_hidden_size=12, swiglu=True, init_std=0.2, num_layers=2, layer_number=1,
                       seed=5)
    return build_moe(cfg, shape, ParallelGroups.single_process())


def test_layer_routes_each_token_to_its_k_and_records_the_histogram():
    layer = _layer()
    s_T = torch.tensor([0.3, 0.3, 0.3, 0.7, 0.7, 0.0])
    importance = Importance(score_T=s_T, valid_T=torch.tensor([True] * 5 + [False]))
    out = layer(torch.randn(6, 8), TokenInfo(valid_T=importance.valid_T, importance=importance))
    assert (out[5] == 0).all()  # padding: no expert
    stats = layer.pop_stats()
    assert stats["k_hist"].tolist() == [0, 0, 3, 2, 0]  # 3 tokens with K = 2, 2 with K = 3
    assert stats["copies"] == 12 and stats["valid_tokens"] == 5


def test_predictor_trains_toward_the_target_and_only_the_head():
    layer = _layer(importance_mode="predicted")
    x_TD = torch.randn(10, 8, requires_grad=True)
    target = Importance(score_T=torch.rand(10), valid_T=torch.ones(10, dtype=torch.bool))
    layer.train()
    layer(x_TD, TokenInfo(importance=target)).sum().backward()
    assert layer.importance_head.weight.grad.abs().sum() > 0  # the MSE reaches the head
    assert layer.pop_stats()["router_loss"] == pytest.approx(float(((0.5 - target.score_T) ** 2).mean()), rel=1e-5)
    # The input was detached for the head: the backbone's gradient is the same without the predictor's loss.
    grad_with = x_TD.grad.clone()
    x_TD.grad = None
    layer.eval()  # no target, no MSE; same routing (s_hat = 0.5 before any update)
    layer.train(False)
    layer(x_TD, TokenInfo()).sum().backward()
    assert torch.allclose(grad_with, x_TD.grad, atol=1e-6)


def test_running_budget_routes_with_the_previous_calibration():
    layer = _layer(importance_mode="predicted", budget="running", budget_k_mean=2.0)
    layer.train()
    layer(torch.randn(8, 8), TokenInfo())
    stats = layer.pop_stats()
    assert stats["k_hist"].tolist() == [0, 0, 8, 0, 0]  # c = 2 k_mean and s_hat = 0.5: K = 2 before calibrating
    assert float(layer.budget_scale) == pytest.approx(4.0)  # the first batch's solution is also 4
