"""CartesianMoE in one process: the spec's forward, the equal-size comparison, the robustness option."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.moe import LayerShape, build_moe
from megamoe.moe.routing import topk_route
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.cartesian import CartesianMoEConfig
from megamoe.variants.cartesian.sizing import equal_size_comparison

D = 16


def make_cartesian(**moe):
    cfg = CartesianMoEConfig(**{"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 12,
                                "shared_expert_intermediate_size": 12, "aux_loss_coeff": 0.01, **moe})
    shape = LayerShape(hidden_size=D, ffn_hidden_size=24, swiglu=True, init_std=0.2, num_layers=2, layer_number=3,
                       seed=5)
    return build_moe(cfg, shape, ParallelGroups.single_process())


def swiglu(x, w1, w2):
    gate, up = (x @ w1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


def sublayer_reference(moe, u):
    """docs/variants.md §5.2 for one sub-layer: fp32 softmax router, top-2 renormalised (fp32 eps clamp), SwiGLU
    experts, softmax(Linear(d, 2)) with bias mixing routed and shared outputs."""
    p = (u.float() @ moe.router.weight.float().t()).softmax(-1)
    w, idx = p.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    experts = moe.experts
    routed = torch.stack([sum(w[t, j] * swiglu(u[t], experts.linear_fc1[idx[t, j]], experts.linear_fc2[idx[t, j]])
                              for j in range(2)) for t in range(u.shape[0])])
    shared = moe.shared_experts
    c = F.linear(u, shared.coefficient.weight, shared.coefficient.bias).softmax(-1)
    return c[:, :1] * routed + c[:, 1:] * swiglu(u, shared.linear_fc1, shared.linear_fc2)


def reference(layer, h):
    """out - h = yA + yB, with yA on norm_a(h) and yB on norm_b(h + yA) (the block adds h)."""
    y_a = sublayer_reference(layer.moe_a, F.rms_norm(h, (D,), layer.norm_a.weight, 1e-5))
    y_b = sublayer_reference(layer.moe_b, F.rms_norm(h + y_a, (D,), layer.norm_b.weight, 1e-5))
    return y_a + y_b


def test_forward_equals_the_spec_and_order_matters():
    torch.manual_seed(0)
    layer = make_cartesian()
    with torch.no_grad():
        layer.norm_b.weight.uniform_(0.5, 1.5)
        layer.moe_a.shared_experts.coefficient.bias.uniform_(-1, 1)
    h = torch.randn(10, D)
    torch.testing.assert_close(layer(h), reference(layer, h), rtol=1e-5, atol=1e-6)
    swapped = make_cartesian()
    swapped.load_state_dict({k.replace("_a.", "_x.").replace("_b.", "_a.").replace("_x.", "_b."): v
                             for k, v in layer.state_dict().items()})
    assert not torch.allclose(swapped(h), layer(h))  # composition, not a symmetric product


def test_two_expert_sets_and_two_named_aux_losses():
    layer = make_cartesian()
    assert not torch.equal(layer.moe_a.experts.linear_fc1, layer.moe_b.experts.linear_fc1)
    keys = set(layer.state_dict())
    assert {"moe_a.experts.linear_fc1", "moe_b.experts.linear_fc1", "norm_a.weight", "norm_b.weight"} <= keys
    layer(torch.randn(8, D))
    assert layer.moe_a.shape.label == "layer3a" and layer.moe_b.shape.label == "layer3b"
    assert layer.moe_a.pop_stats()["balance_loss"] > 0 and layer.moe_b.pop_stats()["balance_loss"] > 0


def test_the_three_configurations_have_equal_size():
    sizes = equal_size_comparison(hidden_size=64, ffn_hidden_size=96, num_experts=8)
    assert sizes["top2"].routed_total == sizes["fine_grained"].routed_total == sizes["cartesian"].routed_total
    assert sizes["top2"].routed_active == sizes["fine_grained"].routed_active == sizes["cartesian"].routed_active
    assert sizes["fine_grained"].shared == sizes["cartesian"].shared == 3 * 64 * 96 and sizes["top2"].shared == 0
    assert sizes["top2"].routed_total == 8 * 3 * 64 * 96 and sizes["top2"].routed_active == 2 * 3 * 64 * 96


def test_dropping_the_top_rank_routes_to_the_next_k():
    """Scores rank experts 0, 2, 1, 3, 4: without the best (0) the top-2 are experts 2 and 1, renormalised."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    routing = topk_route(logits, k=2, pre_softmax=False, skip=1)
    assert routing.expert_N.tolist() == [1, 2]
    probs = logits.softmax(-1)[0]
    torch.testing.assert_close(routing.weight_N, torch.stack([probs[1], probs[2]]) / (probs[1] + probs[2]))


def test_robustness_option_applies_in_evaluation_to_the_chosen_scope():
    torch.manual_seed(1)
    normal, dropped = make_cartesian(), make_cartesian(drop_top_ranks=1, drop_top_scope="b")
    dropped.load_state_dict(normal.state_dict())
    h = torch.randn(12, D)
    torch.testing.assert_close(dropped(h), normal(h))  # training: unaffected
    normal.eval()
    dropped.eval()
    u = F.rms_norm(h, (D,), normal.norm_a.weight, 1e-5)
    from megamoe.moe.layer import TokenInfo

    route_a = [m.route(u, TokenInfo())[0].expert_N for m in (normal.moe_a, dropped.moe_a)]
    assert torch.equal(*route_a)  # scope b: sub-layer A routes as usual
    logits = u.float() @ normal.moe_b.router.weight.float().t()
    want = logits.topk(3, dim=-1).indices[:, 1:].sort(dim=-1).values.reshape(-1)
    got = dropped.moe_b.route(u, TokenInfo())[0].expert_N
    assert torch.equal(got, want)  # sub-layer B takes ranks 2 and 3


def test_top1_trains_its_routers_from_the_lm_loss():
    """Top-1 gates with the chosen expert's probability (router_pre_softmax=true; the renormalised weight would be
    1 and give the routers no gradient, so that combination is refused by the config)."""
    layer = make_cartesian(router_topk=1, router_pre_softmax=True, aux_loss_coeff=0.0)
    h = torch.randn(32, D)
    layer(h).square().sum().backward()
    norms = [layer.moe_a.router.weight.grad.norm().item(), layer.moe_b.router.weight.grad.norm().item()]
    print(f"router gradient norms from the output alone (A, B): {norms}")
    assert all(norm > 1e-3 for norm in norms)
