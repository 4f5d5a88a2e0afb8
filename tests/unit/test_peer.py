"""PEER in one process: exact product-key retrieval, the layer against a per-token loop, the hand-written
chunked backward, query BatchNorm, initialisation, usage metrics, configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from megamoe.moe import LayerShape, build_moe
from megamoe.moe.layer import TokenInfo
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.peer import PEERMoEConfig
from megamoe.variants.peer import layer as peer_layer
from megamoe.variants.peer.layer import PEERTables, _SingletonExperts
from megamoe.variants.peer.product_keys import MaskedBatchNorm, product_key_topk

D = 16


def make_peer(**moe):
    cfg = PEERMoEConfig(**{"num_experts": 256, "num_heads": 2, "topk_per_head": 4, "key_dim": 8, **moe})
    shape = LayerShape(hidden_size=D, ffn_hidden_size=32, swiglu=True, init_std=0.2, num_layers=2, layer_number=1,
                       seed=3)
    return build_moe(cfg, shape, ParallelGroups.single_process())


@pytest.mark.parametrize("shared", [True, False])
def test_product_keys_equal_exhaustive_top_k(shared):
    """sqrt(N) = 64, k = 8, 200 random queries x 3 heads: same ids (id = a*64 + b) and scores as scoring all N."""
    gen = torch.Generator().manual_seed(0)
    n, half, heads, k = 64, 6, 3, 8
    q = torch.randn(200, heads, 2 * half, generator=gen, dtype=torch.float64)
    shape = (n, half) if shared else (heads, n, half)
    keys1, keys2 = torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randn(*shape, generator=gen,
                                                                                        dtype=torch.float64)
    scores, ids = product_key_topk(q, keys1, keys2, k)
    k1 = keys1.expand(heads, n, half) if shared else keys1
    k2 = keys2.expand(heads, n, half) if shared else keys2
    full = (torch.einsum("thc,hac->tha", q[..., :half], k1)[..., :, None]
            + torch.einsum("thc,hbc->thb", q[..., half:], k2)[..., None, :]).flatten(-2)  # id = a * n + b
    want_scores, want_ids = full.topk(k, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores)


@pytest.mark.parametrize("shared", [True, False])
def test_product_key_gradients_equal_those_of_scoring_all_pairs(shared):
    """The backward through the chosen sub-keys only gives the gradients autograd gives the exhaustive scores."""
    gen = torch.Generator().manual_seed(1)
    n, half, heads, k = 32, 5, 3, 4
    q = torch.randn(50, heads, 2 * half, generator=gen, dtype=torch.float64, requires_grad=True)
    shape = (n, half) if shared else (heads, n, half)
    keys1 = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    keys2 = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(50, heads, k, generator=gen, dtype=torch.float64)
    scores, _ = product_key_topk(q, keys1, keys2, k)
    got = torch.autograd.grad((scores * weights).sum(), (q, keys1, keys2))
    k1 = keys1.expand(heads, n, half) if shared else keys1
    k2 = keys2.expand(heads, n, half) if shared else keys2
    full = (torch.einsum("thc,hac->tha", q[..., :half], k1)[..., :, None]
            + torch.einsum("thc,hbc->thb", q[..., half:], k2)[..., None, :]).flatten(-2)
    want = torch.autograd.grad((full.topk(k, dim=-1).values * weights).sum(), (q, keys1, keys2))
    for name, g, w in zip(("q", "keys1", "keys2"), got, want, strict=True):
        torch.testing.assert_close(g, w, msg=name)
        assert w.abs().sum() > 0, name


def per_token_reference(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """y_t = sum over heads and retrieved experts of g * gelu(u . x_t) v, one token at a time."""
    gates, ids = layer.retrieve(x_TD, None)
    down_N = layer.experts.down[layer.placement]  # expert id -> its row
    up_N = layer.experts.up[layer.placement]
    out = []
    for t in range(x_TD.shape[0]):
        u, v, g = down_N[ids[t]], up_N[ids[t]], gates[t]  # [h, k, D], [h, k]
        out.append((g[..., None] * F.gelu((u * x_TD[t]).sum(-1))[..., None] * v).sum((0, 1)))
    return torch.stack(out)


def test_layer_equals_the_per_token_loop_and_gates_sum_to_one():
    torch.manual_seed(1)
    layer = make_peer().eval()
    x_TD = torch.randn(12, D)
    torch.testing.assert_close(layer(x_TD), per_token_reference(layer, x_TD), rtol=1e-5, atol=1e-6)
    gates, _ = layer.retrieve(x_TD, None)
    torch.testing.assert_close(gates.sum(-1), torch.ones(12, 2))  # softmax over each head's k scores


def test_chunked_equals_unchunked():
    torch.manual_seed(2)
    whole, chunked = make_peer(chunk_tokens=10_000), make_peer(chunk_tokens=1)
    chunked.load_state_dict(whole.state_dict())
    x_TD = torch.randn(9, D)
    torch.testing.assert_close(chunked(x_TD), whole(x_TD))


@pytest.mark.parametrize("sddmm", [True, False])
def test_singleton_experts_backward_is_exact(sddmm, monkeypatch):
    """gradcheck (float64) of the hand-written backward: masked slots, a row used twice, chunks of 2 tokens; the
    slots' dot products by the CPU's sampled product and by gathers."""
    monkeypatch.setattr(peer_layer, "_sddmm_applies", lambda *_: sddmm)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    rows = torch.tensor([[2, 5, 0], [2, 0, 0], [1, 4, 4], [0, 1, 3], [5, 5, 2]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    w = (torch.rand(5, 3, dtype=torch.float64, generator=gen) * mask).requires_grad_()
    down = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)

    def experts(x, w, down, up):
        return _SingletonExperts.apply(x, rows, w * mask, mask, down, up, 2)

    assert torch.autograd.gradcheck(experts, (x, w, down, up))


def test_slot_dots_by_sampled_product_equal_gathers():
    """The CPU's sampled product takes each token's rows as routing leaves them (unsorted, repeated, the masked
    slots' row 0); a token with more slots than the table has rows takes the gathers (the sampled product fails)."""
    gen = torch.Generator().manual_seed(4)
    x_GD, table_RD = torch.randn(7, 8, generator=gen), torch.randn(5, 8, generator=gen)
    rows_GM = torch.tensor([[4, 1, 1, 0], [0, 0, 0, 0], [3, 2, 4, 1], [1, 4, 0, 0], [2, 2, 2, 2], [4, 3, 2, 1],
                            [0, 4, 0, 4]])
    gathered_GM = (table_RD[rows_GM] * x_GD[:, None, :]).sum(-1)
    assert peer_layer._sddmm_applies(x_GD, table_RD, rows_GM)
    torch.testing.assert_close(peer_layer._slot_dots(x_GD, table_RD, rows_GM, chunk=3), gathered_GM)
    wide_GM = torch.cat([rows_GM, rows_GM[:, :2]], dim=1)  # 6 slots, 5 rows
    assert not peer_layer._sddmm_applies(x_GD, table_RD, wide_GM)
    torch.testing.assert_close(peer_layer._slot_dots(x_GD, table_RD, wide_GM, chunk=3),
                               (table_RD[wide_GM] * x_GD[:, None, :]).sum(-1))


def test_batchnorm_train_and_eval_paths_and_padding():
    gen = torch.Generator().manual_seed(3)
    bn = MaskedBatchNorm(4)
    x = torch.randn(10, 4, generator=gen) * 3 + 1
    valid = torch.tensor([True] * 7 + [False] * 3)
    garbage = x.clone()
    garbage[7:] = 1e4  # padding content must not matter
    out = bn(garbage, valid)
    reference = torch.nn.BatchNorm1d(4)
    want = reference(x[:7])
    torch.testing.assert_close(out[:7], want)  # training: batch statistics of the valid rows
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    torch.testing.assert_close(bn.running_var, reference.running_var)
    bn.eval()
    reference.eval()
    torch.testing.assert_close(bn(x), reference(x))  # evaluation: running statistics


def test_batchnorm_updates_once_under_activation_recomputation():
    bn = MaskedBatchNorm(3)
    x = torch.randn(8, 3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(bn, x, use_reentrant=True).sum().backward()  # recomputes the forward
    plain = MaskedBatchNorm(3)
    plain(x.detach())
    torch.testing.assert_close(bn.running_mean, plain.running_mean)
    torch.testing.assert_close(bn.running_var, plain.running_var)


def test_initialisation():
    layer = make_peer(num_experts=4096)
    std = layer.experts.down.std().item()
    assert abs(std - D ** -0.5) / D ** -0.5 < 0.05  # N(0, 1/d), not nn.Embedding's N(0, 1)
    assert layer.keys1.abs().max() <= 4 ** -0.5  # U(+-1/sqrt(d_k/2))
    assert sorted(layer.placement.tolist()) == list(range(4096))  # a permutation of the experts


def test_tables_do_not_depend_on_the_sharding():
    kwargs = dict(hidden_size=D, seed=1, layer_number=2)
    full = PEERTables(num_local=10_000, first_row=0, **kwargs)
    shard = PEERTables(num_local=5_000, first_row=5_000, **kwargs)
    assert torch.equal(full.down[5_000:], shard.down) and torch.equal(full.up[5_000:], shard.up)


def test_usage_and_unevenness():
    layer = make_peer()
    layer._usage = torch.ones(256, dtype=torch.float64)
    assert layer.validation_metrics() == {"usage": 1.0, "unevenness": pytest.approx(0.0, abs=1e-12)}
    layer._usage = torch.zeros(256, dtype=torch.float64)
    layer._usage[7] = 3.0
    metrics = layer.validation_metrics()
    assert metrics["usage"] == 1 / 256 and metrics["unevenness"] == pytest.approx(math.log(256))


def test_padding_gets_no_experts():
    layer = make_peer()
    x_TD = torch.randn(6, D)
    valid = torch.tensor([True, True, False, True, False, True])
    out = layer(x_TD, TokenInfo(valid_T=valid))
    assert (out[~valid] == 0).all()
    layer.eval()
    garbage = x_TD.clone()
    garbage[~valid] = 100.0
    tokens = TokenInfo(valid_T=valid)
    torch.testing.assert_close(layer(garbage, tokens)[valid], layer(x_TD, tokens)[valid])


def test_placement_is_saved_with_the_model():
    layer = make_peer(placement_seed=9)
    state = layer.state_dict()
    assert torch.equal(state["placement"], torch.randperm(256, generator=torch.Generator().manual_seed(9)))
    other = make_peer(placement_seed=1)
    other.load_state_dict(state)
    assert torch.equal(other.placement, layer.placement)
