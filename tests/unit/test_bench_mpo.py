"""The MPOE experts benchmark on tiny experts: the chain and the floor compute what the rebuild computes, and
the gradients reach the MPO tensors both ways; no timing is asserted."""

from __future__ import annotations

import torch

from megamoe.studies import bench_mpo
from megamoe.studies.bench import Timing

TINY = bench_mpo.MPOBenchShape(hidden_size=16, ffn_hidden_size=24, swiglu=True, num_experts=4, num_rows=30)
RELU = bench_mpo.MPOBenchShape(hidden_size=16, ffn_hidden_size=24, swiglu=False, num_experts=2, num_rows=7,
                               max_bond=3)


def test_every_method_computes_the_rebuilt_experts_output():
    for name, shape in (("swiglu", TINY), ("truncated", RELU)):
        records = bench_mpo.bench_shape(name, shape, list(bench_mpo.METHODS), Timing(warmup=0, iters=1), seed=3)
        assert [r.method for r in records] == list(bench_mpo.METHODS)
        for r in records:
            assert r.median_s > 0 and r.rel_diff <= 1e-5, r
        assert bench_mpo.verdict(records)[0].startswith(f"{name}: ")


def test_chain_gradients_equal_the_rebuild_gradients():
    experts = bench_mpo.build_experts(TINY, seed=5)
    x_RD = torch.randn(TINY.num_rows, TINY.hidden_size)
    counts_e = torch.tensor([10, 0, 12, 8])
    grads = []
    for forward in (experts.forward, lambda x, c: bench_mpo.chain_ffn(experts, x, c)):
        bench_mpo.zero_grads(experts)
        forward(x_RD, counts_e).square().sum().backward()
        central = experts.central_tensors()  # the layer's shared tensors
        grads.append([p.grad.clone() for p in experts.parameters()] + [c.grad.clone() for c in central.values()])
    for rebuilt, chained in zip(*grads, strict=True):
        assert torch.allclose(rebuilt, chained, rtol=1e-4, atol=1e-6)


def test_unknown_shape_or_method_is_named():
    for shapes, methods, word in ((["huge"], ["chain"], "shape 'huge'"), (["tiny"], ["fast"], "method 'fast'")):
        try:
            bench_mpo.validate(shapes, methods)
        except ValueError as err:
            assert word in str(err)
        else:
            raise AssertionError("accepted")
