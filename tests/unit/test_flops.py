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
