"""One MoE layer in one process: experts, dispatch with any number of experts per token, capacity, shared
experts, expert bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamoe.moe import LayerShape, build_moe
from megamoe.moe.dispatch import LocalDispatcher
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.layer import TokenInfo
from megamoe.moe.routing import Routing
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.topk import TopKMoEConfig

D, F_EXPERT = 16, 24


def make_layer(**moe) -> torch.nn.Module:
    cfg = TopKMoEConfig(**{"num_experts": 4, "router_topk": 2, "aux_loss_coeff": 0.0, **moe})
    shape = LayerShape(hidden_size=D, ffn_hidden_size=F_EXPERT, swiglu=True, init_std=0.1, num_layers=2,
                       layer_number=1, seed=3)
    return build_moe(cfg, shape, ParallelGroups.single_process())


def expert_ffn(layer, expert: int, x_D: torch.Tensor) -> torch.Tensor:
    w1, w2 = layer.experts.linear_fc1[expert], layer.experts.linear_fc2[expert]
    gate, up = (x_D @ w1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


def loop_reference(layer, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """y_t = sum over t's copies of weight * FFN_e(x_t), one copy at a time."""
    out = torch.zeros_like(x_TD)
    for t, e, w in zip(routing.token_N.tolist(), routing.expert_N.tolist(), routing.weight_N, strict=True):
        out[t] = out[t] + w * expert_ffn(layer, e, x_TD[t])
    return out


def test_layer_equals_a_per_copy_loop():
    torch.manual_seed(0)
    layer = make_layer()
    x_TD = torch.randn(20, D)
    routing = layer.route(x_TD, TokenInfo())[0]
    torch.testing.assert_close(layer(x_TD), loop_reference(layer, x_TD, routing))


def test_variable_k_with_empty_tokens_and_experts():
    """Tokens with 0, 1, 3 copies and experts with none: dispatch + combine equals the loop, 0 stays 0."""
    torch.manual_seed(1)
    layer = make_layer()
    x_TD = torch.randn(5, D, requires_grad=True)
    routing = Routing(token_N=torch.tensor([0, 0, 0, 2, 4]), expert_N=torch.tensor([0, 1, 3, 3, 1]),
                      weight_N=torch.tensor([0.5, 0.3, 0.2, 1.0, 0.7], requires_grad=True), probs_TE=None,
                      logits_TE=None, valid_T=None, num_tokens=5, num_experts=4)  # expert 2 and tokens 1, 3: none
    dispatcher = LocalDispatcher(4)
    x_RD, counts_e, meta = dispatcher.dispatch(x_TD, routing)
    assert counts_e.tolist() == [1, 2, 0, 2]
    out_TD = dispatcher.combine(layer.experts(x_RD, counts_e), routing, meta)
    torch.testing.assert_close(out_TD, loop_reference(layer, x_TD, routing))
    assert (out_TD[[1, 3]] == 0).all()  # C3: exactly 0, no NaN
    out_TD.square().sum().backward()
    assert (x_TD.grad[[1, 3]] == 0).all() and torch.isfinite(x_TD.grad).all()


def test_grouped_gemm_equals_the_loop():
    torch.manual_seed(2)
    loop, grouped = make_layer(grouped_gemm="off"), make_layer(grouped_gemm="on")
    grouped.load_state_dict(loop.state_dict())
    x_TD = torch.randn(32, D)
    g_TD = torch.randn(32, D)
    results = []
    for layer in (loop, grouped):
        x = x_TD.clone().requires_grad_()
        (layer(x) * g_TD).sum().backward()
        results.append((layer(x_TD).detach(), x.grad, layer.experts.linear_fc1.grad, layer.router.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_expert_is_the_dense_ffn():
    layer = make_layer(num_experts=1, router_topk=1, router_pre_softmax=True)
    x_TD = torch.randn(8, D)
    torch.testing.assert_close(layer(x_TD), torch.stack([expert_ffn(layer, 0, x) for x in x_TD]))


def test_capacity_mode_and_padding_to_capacity():
    torch.manual_seed(4)
    dropless = make_layer()
    capped = make_layer(expert_capacity_factor=0.5)
    padded = make_layer(expert_capacity_factor=0.5, pad_expert_input_to_capacity=True)
    for layer in (capped, padded):
        layer.load_state_dict(dropless.state_dict())
    x_TD = torch.randn(24, D)
    out_capped = capped(x_TD)
    stats = capped.pop_stats()
    capacity = 6  # ceil(0.5 * 24 * 2 / 4)
    assert stats["tokens_per_expert"].max() <= capacity
    assert stats["dropped"] + stats["copies"] == 48 and stats["dropped"] > 0
    torch.testing.assert_close(padded(x_TD), out_capped)  # padding rows never reach the output
    assert not torch.allclose(out_capped, dropless(x_TD))


@pytest.mark.parametrize("combine", ["add", "gate", "residual"])
def test_shared_expert_combinations(combine):
    torch.manual_seed(5)
    layer = make_layer(shared_expert_intermediate_size=12, shared_expert_combine=combine)
    x_TD = torch.randn(6, D)
    routed = make_layer()
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if "shared" not in k})
    shared = layer.shared_experts
    gate, up = (x_TD @ shared.linear_fc1.t()).chunk(2, dim=-1)
    shared_TD = (F.silu(gate) * up) @ shared.linear_fc2.t()
    if combine == "add":
        want = routed(x_TD) + shared_TD
    elif combine == "gate":
        want = routed(x_TD) + torch.sigmoid(x_TD @ shared.gate_weight.t()) * shared_TD
    else:
        coef = shared.coefficient(x_TD).softmax(-1)
        want = coef[:, :1] * routed(x_TD) + coef[:, 1:] * shared_TD
    torch.testing.assert_close(layer(x_TD), want)


def test_expert_bias_moves_toward_balance():
    layer = make_layer(router_enable_expert_bias=True, router_bias_update_rate=0.01, router_topk=1,
                       router_pre_softmax=True)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # every token prefers expert 0 when x[0] > 0
    x_TD = torch.randn(64, D).abs()
    layer(x_TD)
    layer.finish_step()
    bias = layer.expert_bias
    assert bias[0] < 0 and (bias[1:] > 0).all()
    assert layer.to(torch.bfloat16).expert_bias.dtype == torch.float32  # kept fp32 under a module cast


def test_experts_do_not_depend_on_sharding():
    """Expert e gets the same initial weights whether its rank holds 4 experts or 2."""
    kwargs = dict(hidden_size=D, ffn_hidden_size=F_EXPERT, swiglu=True, init_std=0.1, output_init_std=0.05, seed=3,
                  layer_number=2)
    full = GroupedExperts(num_local=4, first_expert=0, **kwargs)
    second_half = GroupedExperts(num_local=2, first_expert=2, **kwargs)
    assert torch.equal(full.linear_fc1[2:], second_half.linear_fc1)
    assert torch.equal(full.linear_fc2[2:], second_half.linear_fc2)


def test_statistics_stay_exact_and_pads_are_excluded():
    layer = make_layer()
    x_TD = torch.randn(10, D)
    valid_T = torch.tensor([True] * 7 + [False] * 3)
    layer(x_TD, TokenInfo(valid_T=valid_T))
    stats = layer.pop_stats()
    assert stats["copies"] == 14 and stats["valid_tokens"] == 7 and stats["k_max"] == 2
    assert stats["tokens_per_expert"].sum() == 14 and layer.pop_stats() == {}


def test_global_balance_loss_accumulates_over_the_step():
    from megamoe.moe.losses import global_balance_loss, switch_balance_loss

    layer = make_layer(router_load_balancing_type="global_aux_loss", aux_loss_coeff=0.01)
    x1, x2 = torch.randn(8, D), torch.randn(8, D)
    layer(x1)
    first = layer.pop_stats()["balance_loss"]
    torch.testing.assert_close(first, switch_balance_loss(layer.route(x1, TokenInfo())[0]))  # one micro-batch so far
    layer(x2)
    r1, r2 = layer.route(x1, TokenInfo())[0], layer.route(x2, TokenInfo())[0]
    share_E = (r1.tokens_per_expert() + r2.tokens_per_expert()).float() / 32
    torch.testing.assert_close(layer.pop_stats()["balance_loss"], global_balance_loss(r2, share_E))
    layer.finish_step()  # a new step starts counting afresh
    layer(x2)
    torch.testing.assert_close(layer.pop_stats()["balance_loss"], switch_balance_loss(r2))


def test_jitter_is_reproducible_and_leaves_the_global_rng_alone():
    a, b = make_layer(input_jitter_eps=0.1), make_layer(input_jitter_eps=0.1)
    b.load_state_dict(a.state_dict())
    x_TD = torch.randn(16, D)
    state = torch.get_rng_state()
    out_a, out_b = a(x_TD), b(x_TD)
    assert torch.equal(torch.get_rng_state(), state)  # routing never draws from the global RNG
    torch.testing.assert_close(out_a, out_b)
    assert not torch.allclose(a(x_TD), out_a)  # a new draw per forward
    a.eval()
    torch.testing.assert_close(a(x_TD), a(x_TD))  # no jitter in evaluation


def test_router_runs_in_fp32_under_bf16():
    layer = make_layer().to(torch.bfloat16)
    routing = layer.route(torch.randn(8, D).to(torch.bfloat16), TokenInfo())[0]
    assert routing.logits_TE.dtype == routing.probs_TE.dtype == routing.weight_N.dtype == torch.float32
    assert layer(torch.randn(8, D).to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("swiglu", [True, False])
def test_expert_loop_equals_per_row_autograd(swiglu):
    """The expert loop's hand-written backward (input and weight gradients, an expert with no rows) equals
    autograd through a row-by-row computation."""
    from megamoe.moe.experts import expert_ffn as grouped_ffn
    from megamoe.moe.experts import ffn_activation

    torch.manual_seed(6)
    fc1 = (torch.randn(4, 2 * F_EXPERT if swiglu else F_EXPERT, D) * 0.3).requires_grad_()
    fc2 = (torch.randn(4, D, F_EXPERT) * 0.3).requires_grad_()
    x_RD, counts_e = torch.randn(30, D, requires_grad=True), torch.tensor([10, 0, 12, 8])
    g_RD = torch.randn(30, D)
    (grouped_ffn(x_RD, counts_e, fc1, fc2, swiglu, grouped_gemm="off") * g_RD).sum().backward()
    got = (x_RD.grad, fc1.grad, fc2.grad)
    x_RD.grad, fc1.grad, fc2.grad = None, None, None
    expert_R = torch.repeat_interleave(torch.arange(4), counts_e)
    rows = [ffn_activation(x @ fc1[e].t(), swiglu) @ fc2[e].t() for x, e in zip(x_RD, expert_R.tolist(), strict=True)]
    (torch.stack(rows) * g_RD).sum().backward()
    assert torch.equal(got[1][1], torch.zeros_like(fc1[1])) and torch.equal(got[2][1], torch.zeros_like(fc2[1]))
    for a, b in zip(got, (x_RD.grad, fc1.grad, fc2.grad), strict=True):
        torch.testing.assert_close(a, b)
