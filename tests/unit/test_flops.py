"""The FLOP ledger behind train/tflops and train/mfu: model FLOPs per token counted by hand, the peak."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT, tiny_config


def test_dense_flops_per_token_by_hand(tiny_data):
    from megamoe.train.flops import train_flops_per_token

    cfg = tiny_config(tiny_data)  # 2 layers, d 64, 4 heads of 16, 2 KV groups, SwiGLU 128, sequence 32, causal
    d, layers, vocab = 64, 2, 512
    attention = d * (4 + 2 * 2) * 16 + 4 * 16 * d + 2 * (32 / 2) * 4 * 16
    mlp = 3 * d * 128
    assert train_flops_per_token(cfg, vocab) == 6 * (layers * (attention + mlp) + d * vocab)


def test_top2_at_equal_active_ffn_costs_the_router_more(tiny_data):
    """configs/tiny-moe.yaml: 8 experts of half the dense width, top-2: the FFN FLOPs of tiny-dense.yaml plus the
    router's d x E per MoE layer."""
    from megamoe import config
    from megamoe.train.flops import train_flops_per_token

    data = [f"data.data_path=[{tiny_data['prefix']}]", f"data.tokenizer_model={tiny_data['tokenizer']}"]
    dense = config.load(ROOT / "configs" / "tiny-dense.yaml", data)
    moe = config.load(ROOT / "configs" / "tiny-moe.yaml", data)
    router = moe.model.num_layers * moe.model.hidden_size * moe.moe.num_experts
    assert train_flops_per_token(moe, 4000) - train_flops_per_token(dense, 4000) == 6 * router


def test_peak_from_the_config_or_a_cached_gemm(tiny_data, tmp_path, monkeypatch):
    from megamoe.train import flops

    assert flops.peak_tflops(tiny_config(tiny_data, "logging.peak_tflops=2.5"), world_size=4) == 10.0
    timings = []
    monkeypatch.setattr(flops, "CACHE", tmp_path)
    monkeypatch.setattr(flops, "_time_gemm", lambda: timings.append(1) or 0.25)
    assert flops.peak_tflops(tiny_config(tiny_data), world_size=2) == pytest.approx(0.5)
    assert flops.peak_tflops(tiny_config(tiny_data), world_size=2) == pytest.approx(0.5)
    assert len(timings) == 1  # measured once per machine and thread count, then read from the cache
    ledger = flops.Ledger(flops_per_token=1e9, peak_tflops=0.5)
    assert ledger.values(250.0) == {"train/tflops": 0.25, "train/mfu": 0.5}


def test_the_ledger_counts_the_copies_a_step_made(tiny_data):
    """Each routed copy per token above or below the nominal top-2 adds or removes one expert's FFN (3 x d x F
    multiply-adds, x6 for the training FLOPs) in every MoE layer: dropped copies and DA-MoE's realised K."""
    from megamoe.train.flops import Ledger, train_flops_per_token

    cfg = tiny_config(tiny_data, "moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64")
    ledger = Ledger.of(cfg, 512, world_size=1)
    assert ledger.flops_per_token == train_flops_per_token(cfg, 512) and ledger.nominal_experts_per_token == 2
    per_copy = 6 * cfg.model.num_layers * 3 * cfg.model.hidden_size * 64
    assert ledger.values(1e6, experts_per_token=2.0) == ledger.values(1e6)
    assert ledger.values(1e6, 1.5)["train/tflops"] == pytest.approx((ledger.flops_per_token - per_copy / 2) / 1e6)


def test_mpoe_rebuild_is_counted_once_per_step_as_the_profiler_counts_it(tiny_data):
    """The rebuild's multiply-adds by formula equal the profiler's FLOP count of operators.reconstruct; the
    ledger spreads E x (every matrix's rebuild) per MoE layer over the step's tokens."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megamoe.train.flops import train_flops_per_token
    from megamoe.variants.mpo.operators import reconstruct
    from megamoe.variants.mpo.shapes import MPOShape, auto_shape

    for shape in (auto_shape(352, 128, 5), auto_shape(128, 176, 3), MPOShape(i=(2, 3, 4), j=(5, 2, 2), max_bond=3)):
        tensors = [torch.randn(*shape.tensor_shape(k)) for k in range(shape.n)]
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            reconstruct(tensors, shape)
        assert shape.reconstruct_madds == sum(e.flops for e in prof.events() if e.flops) / 2, shape
    cfg = tiny_config(tiny_data, "moe.variant=mpo", "moe.num_experts=4")
    from megamoe import variants

    rebuild = variants.get("mpo").step_madds(cfg.moe, cfg.model)
    per_step = train_flops_per_token(cfg, 512, tokens_per_step=1000) - train_flops_per_token(cfg, 512)
    assert per_step == pytest.approx(6 * cfg.model.num_layers * rebuild / 1000) and rebuild > 0
