"""The megatron-core GPT built from a RunConfig: architecture options, the per-layer MLP slot, norms."""

from __future__ import annotations

import pytest
import torch

from megamoe.parallel.groups import ParallelGroups
from tests.helpers import spawn, tiny_config

VARIANTS = {
    "llama": [],
    "gpt2": ["model.normalization=LayerNorm", "model.swiglu=false", "model.position_embedding_type=learned_absolute",
             "model.untie_embeddings_and_output_weights=false", "model.add_bias_linear=true",
             "model.num_query_groups=null"],
    "dropout": ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"],
}


def _model_and_loss(data: dict, overrides: list[str], causal: bool = True,
                    batch_seed: int | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny model with `overrides`, after one forward and backward of a random [2, 32] batch (drawn from
    `batch_seed` if given), and its loss."""
    from megamoe.models.gpt import build_model
    from megamoe.parallel.initialize import initialize

    cfg = tiny_config(data, *overrides)
    model = build_model(cfg, 500, initialize(cfg.parallel, cfg.train.seed))
    if batch_seed is not None:
        torch.manual_seed(batch_seed)
    ids = torch.randint(0, 500, (2, 32))
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool).triu(1) if causal else None
    loss = model(ids, torch.arange(32).expand(2, -1), mask, labels=ids).mean()
    loss.backward()
    return model, loss


def _forward_backward(data: dict) -> dict:
    out = {}
    for name, overrides in VARIANTS.items():
        model, loss = _model_and_loss(data, overrides)
        out[name] = {
            "loss": loss.item(),
            "no_grad": [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0],
            "params": {n: tuple(p.shape) for n, p in model.named_parameters()},
            "norm": type(model.decoder.final_layernorm).__name__,
        }
    return out


@pytest.fixture(scope="module")
def built(tiny_data) -> dict:
    return spawn(_forward_backward, 1, tiny_data)[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains(built, variant):
    run = built[variant]
    assert 5.0 < run["loss"] < 7.0, run["loss"]  # ~ln(512) = 6.2: an untrained model over a 512-row padded vocab
    assert run["no_grad"] == [], f"parameters without gradient: {run['no_grad']}"


def test_llama_options(built):
    params = built["llama"]["params"]
    assert built["llama"]["norm"] == "RMSNorm"
    assert "output_layer.weight" in params  # untied
    assert params["embedding.word_embeddings.weight"] == (512, 64)  # 500 padded to a multiple of 64
    assert params["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 16, 64)  # GQA: 2 groups
    assert params["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 128, 64)  # SwiGLU: gate and up
    assert not any(name.endswith("bias") for name in params)


def test_gpt2_options(built):
    params = built["gpt2"]["params"]
    assert built["gpt2"]["norm"] == "LayerNorm"
    assert "output_layer.weight" not in params  # tied to the embedding
    assert "embedding.position_embeddings.weight" in params
    assert params["decoder.layers.0.mlp.linear_fc1.weight"] == (128, 64)
    assert "decoder.layers.0.mlp.linear_fc1.bias" in params


def test_mlp_slot_is_chosen_per_layer(tiny_data, monkeypatch):
    from megamoe.models import megatron as mm

    seen = []
    real = mm.mlp_spec
    monkeypatch.setattr(mm, "mlp_spec", lambda cfg, n, dense, g, **moe: seen.append(n) or real(cfg, n, dense, g, **moe))
    spec = mm.decoder_block_spec(tiny_config(tiny_data, "model.num_layers=3"), ParallelGroups.single_process())
    assert seen == [1, 2, 3] and len(spec.layer_specs) == 3
    assert spec.layer_specs[0].submodules.mlp.module.__name__ == "MLP"


def test_norms_match_torch():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megamoe.models.norms import LayerNorm, RMSNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    x = torch.randn(3, 8)
    rms, ln = RMSNorm(cfg, 8, eps=1e-6), LayerNorm(cfg, 8, eps=1e-6)
    torch.testing.assert_close(rms(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (8,), eps=1e-6))


def test_padded_vocab_size():
    from megamoe.parallel.layout import padded_vocab_size

    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 2) == 50432
    assert padded_vocab_size(512, 64, 2) == 512


ATTENTION_CASES = {"causal, GQA": [], "causal, one group per head": ["model.num_query_groups=null"],
                   "masked LM": ["model.objective=masked_lm"], "dropout (handed to megatron's module)":
                   ["model.attention_dropout=0.1"]}


def _sdpa_against_unfused(data: dict) -> dict:
    """Loss and every gradient of the same model with each attention backend (same seed, same batch)."""
    from megamoe.models.attention import SdpaAttention

    out = {}
    for case, overrides in ATTENTION_CASES.items():
        runs = {}
        for backend in ("sdpa", "unfused"):
            model, loss = _model_and_loss(data, [*overrides, f"model.attention_backend={backend}"],
                                          causal="masked_lm" not in str(overrides), batch_seed=1)
            runs[backend] = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                             "sdpa_modules": sum(isinstance(m, SdpaAttention) for m in model.modules())}
        out[case] = runs
    return out


@pytest.fixture(scope="module")
def attention_backends(tiny_data) -> dict:
    return spawn(_sdpa_against_unfused, 1, tiny_data)[0]


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_sdpa_attention_equals_megatrons_unfused_attention(attention_backends, case):
    """model.attention_backend=sdpa (the default) gives megatron's DotProductAttention's loss and gradients to
    float32 rounding, causal or bidirectional, with grouped queries; dropout runs megatron's own module."""
    sdpa, unfused = attention_backends[case]["sdpa"], attention_backends[case]["unfused"]
    assert sdpa["sdpa_modules"] == 2 and unfused["sdpa_modules"] == 0  # one per layer of the 2-layer model
    torch.testing.assert_close(sdpa["loss"], unfused["loss"], rtol=1e-6, atol=0)
    for name, grad in unfused["grads"].items():
        torch.testing.assert_close(sdpa["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
