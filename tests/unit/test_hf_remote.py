"""megamoe's HF custom code on its own (tests/integration/test_export.py checks it against trained models):
KV-cached generation equals the uncached forward for every causal variant, an encoder's padding changes nothing
for the real tokens, and the MPO rebuild equals megamoe's."""

from __future__ import annotations

import pytest
import torch

from megamoe.hf.remote.configuration_megamoe import MegamoeConfig
from megamoe.hf.remote.modeling_megamoe import MegamoeForCausalLM, MegamoeForMaskedLM

TOPK = {"variant": "topk", "num_experts": 4, "router_topk": 2, "router_pre_softmax": False, "ffn_hidden_size": 32,
        "router_bias": True, "router_enable_expert_bias": True, "shared_expert_intermediate_size": 32,
        "shared_expert_combine": "gate"}
DYNAMIC = {"variant": "dynamic", "num_experts": 4, "ffn_hidden_size": 32, "k_min": 1, "k_max": 3,
           "renormalize": "k>1", "budget_k_mean": 2.0, "normalize": "max", "softmax_temperature": 1.0}
VARIANTS = {
    "topk": TOPK,
    "dynamic_predicted": DYNAMIC | {"importance_mode": "predicted", "budget": "running"},
    "peer": {"variant": "peer", "num_experts": 64, "num_heads": 2, "topk_per_head": 4, "key_dim": 8,
             "shared_keys": False, "query_norm": "batchnorm", "gate": "softmax"},
    "cartesian": TOPK | {"variant": "cartesian", "shared_expert_combine": "residual"},
    "mpo": TOPK | {"variant": "mpo", "router_topk": 1, "router_pre_softmax": True, "router_gate": "unit_st",
                   "shared_expert_intermediate_size": None},
}


def _mpo_shapes() -> dict[str, list[list[int]]]:
    from megamoe.variants.mpo.operators import auto_shape

    dims = {"gate": (32, 64), "up": (32, 64), "down": (64, 32)}
    return {name: [list(auto_shape(rows, cols, 5).tensor_shape(k)) for k in range(5)]
            for name, (rows, cols) in dims.items()}


def _config(moe: dict, **kwargs) -> MegamoeConfig:
    if moe.get("variant") == "mpo":
        moe = moe | {"mpo_tensor_shapes": _mpo_shapes()}
    return MegamoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, moe=moe, moe_layers=[1],
                         initializer_range=0.2, **kwargs)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_generation_equals_the_full_forward(name):
    torch.manual_seed(0)
    model = MegamoeForCausalLM(_config(VARIANTS[name])).eval()
    prompt = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached)
        full = model(cached).logits
        steps = [model(cached[:, :7], use_cache=True)]
        for t in range(7, cached.shape[1]):  # one token at a time through the cache
            steps.append(model(cached[:, t:t + 1], **{"cache": steps[-1].cache} if hasattr(steps[-1], "cache")
                               else {"past_key_values": steps[-1].past_key_values}))
    incremental = torch.cat([s.logits for s in steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)
    assert full.std() > 0.1  # not a vacuous comparison of near-zero logits


@pytest.mark.parametrize("budget", ["batch", "none"])
def test_encoder_padding_changes_nothing_for_real_tokens(budget):
    torch.manual_seed(0)
    moe = DYNAMIC | {"importance_mode": "attention_received", "budget": budget}
    model = MegamoeForMaskedLM(_config(moe, is_causal=False)).eval()
    tokens = torch.randint(4, 96, (2, 10))
    padded = torch.cat([tokens, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 5)], dim=1).long()
    with torch.no_grad():
        want = model(tokens).logits
        got = model(padded, attention_mask=mask).logits[:, :10]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mpo_rebuild_equals_megamoes():
    from megamoe.hf.remote.moe_megamoe import MPOEMoE
    from megamoe.variants.mpo.operators import MPOShape, reconstruct

    torch.manual_seed(0)
    shapes = _mpo_shapes()
    layer = MPOEMoE(VARIANTS["mpo"] | {"mpo_tensor_shapes": shapes}, hidden_size=64).double()
    for param in layer.parameters():
        torch.nn.init.normal_(param)
    for name, tensor_shapes in shapes.items():
        shape = MPOShape(i=tuple(s[1] for s in tensor_shapes), j=tuple(s[2] for s in tensor_shapes))
        tensors = [layer.mpo[name].central if k == 2 else getattr(layer.experts, f"{name}_aux{k + 1}")
                   for k in range(5)]
        torch.testing.assert_close(layer.experts.matrix(name), reconstruct(tensors, shape))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_bf16_model_runs_in_bf16_close_to_fp32(name):
    """bf16 exports load in bf16 by default (config dtype): every activation must stay in that dtype."""
    torch.manual_seed(0)
    model = MegamoeForCausalLM(_config(VARIANTS[name])).eval()
    tokens = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        want = model(tokens).logits
        got = model.to(torch.bfloat16)(tokens).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_string_options_survive_the_import_overrides():
    """`on` / `off` are YAML booleans unless quoted: an exported moe.grouped_gemm=off must import as 'off'."""
    from megamoe import config
    from megamoe.hf.custom import run_overrides
    from tests.helpers import ROOT

    hf_cfg = _config(TOPK | {"grouped_gemm": "off"})
    cfg = config.load(str(ROOT / "configs" / "tiny-dense.yaml"), run_overrides(hf_cfg))
    assert cfg.moe.grouped_gemm == "off" and cfg.moe.variant == "topk"
