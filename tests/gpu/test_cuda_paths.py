"""What only a GPU can check (skipped without CUDA): the grouped-GEMM expert path (torch._grouped_mm, bf16) against
the per-expert loop, and the MoE layer on CUDA against the same layer on the CPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_grouped_gemm_equals_the_expert_loop():
    from megamoe.moe.experts import expert_ffn

    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([0, 40, 7, 81])  # an expert with no rows included
    x = torch.randn(int(counts.sum()), 64, generator=gen)
    fc1, fc2 = torch.randn(4, 96, 64, generator=gen) * 0.05, torch.randn(4, 64, 48, generator=gen) * 0.05
    dy = torch.randn(x.shape[0], 64, generator=gen)
    results = {}
    for path in ("on", "off"):
        tensors = [t.cuda().bfloat16().requires_grad_() for t in (x, fc1, fc2)]
        out = expert_ffn(tensors[0], counts.cuda(), tensors[1], tensors[2], True, grouped_gemm=path)
        out.backward(dy.cuda().bfloat16())
        results[path] = [out.float(), *(t.grad.float() for t in tensors)]
    for got, want in zip(results["on"], results["off"], strict=True):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_moe_layer_on_cuda_equals_cpu():
    from megamoe.moe import LayerShape, build_moe
    from megamoe.parallel.groups import ParallelGroups
    from megamoe.variants.topk import TopKMoEConfig

    cfg = TopKMoEConfig(num_experts=8, router_topk=2, ffn_hidden_size=64)
    shape = LayerShape(hidden_size=32, ffn_hidden_size=64, swiglu=True, init_std=0.02, num_layers=2,
                       layer_number=1, seed=0)
    layer = build_moe(cfg, shape, ParallelGroups.single_process())
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    want = layer(x)
    got = layer.cuda()(x.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
