"""DA-MoE in the full model: parallel layouts against one process, and causality of the `predicted` mode.

Parity (3 steps, fp32, relative differences <= 1e-5): the encoder (masked LM, attention_received) and GPT
(predicted) with EP=2 (ZeRO-2, 2 data-parallel ranks) and TP=2 (sequence parallel: the attention's head sums
are all-reduced over TP and each rank routes its slice) against the single-process run.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import max_rel_diff, spawn, tiny_config, train_steps

STEPS = 3
DA_MOE = ["moe.variant=dynamic", "moe.num_experts=4", "moe.k_max=3", "moe.ffn_hidden_size=64",
          "moe.router_load_balancing_type=seq_aux_loss", f"train.train_iters={STEPS}", "train.clip_grad=0.05"]
MODELS = {"encoder": ["model.objective=masked_lm"], "gpt_predicted": ["moe.importance_mode=predicted"]}
LAYOUTS = {"ep2": ["train.micro_batch_size=4", "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"],
           "tp2": ["train.micro_batch_size=8", "parallel.tensor_model_parallel_size=2",
                   "parallel.sequence_parallel=true"]}


def _runs(data: dict, runs: list[list[str]]) -> list[dict]:
    out = []
    for overrides in runs:
        run = train_steps(data, [*DA_MOE, *overrides], STEPS)
        stats = run.pop("trainer").engine.module
        out.append({**run, "experts_per_token": _copies_per_token(stats)})
    return out


def _copies_per_token(model) -> float:
    from megamoe.train.metrics import moe_layers

    layer = moe_layers(model)[0]
    return float(layer.pop_stats().get("copies", torch.zeros(())))


@pytest.fixture(scope="module")
def parity(tiny_data) -> dict:
    names = list(MODELS)
    reference = spawn(_runs, 1, tiny_data, [[*MODELS[m], "train.micro_batch_size=8"] for m in names])[0]
    out = {(m, "reference"): r for m, r in zip(names, reference, strict=True)}
    for layout, overrides in LAYOUTS.items():
        runs = spawn(_runs, 2, tiny_data, [[*MODELS[m], *overrides] for m in names])[0]
        out.update({(m, layout): r for m, r in zip(names, runs, strict=True)})
    return out


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_da_moe_layout_matches_single_process(parity, model, layout):
    ref, run = parity[(model, "reference")], parity[(model, layout)]
    loss_diff = max(abs(a - b) / b for a, b in zip(run["losses"], ref["losses"], strict=True))
    weight_diff = max_rel_diff(run["full"], ref["full"])
    print(f"{model} {layout}: losses {run['losses']} vs {ref['losses']}, max rel {loss_diff:.1e}; "
          f"weights {weight_diff:.1e}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5


def _prefix_outputs(data: dict, route_on_attention: bool) -> dict[str, float]:
    """Two sequences equal up to position 11 and different after it, in one batch: how much do their outputs
    and routing signals (the importance each MoE layer routes on) at positions <= 11 differ?"""
    from megamoe.models.gpt import build_model
    from megamoe.parallel.initialize import initialize
    from megamoe.variants.dynamic.layer import DynamicMoE

    cfg = tiny_config(data, *DA_MOE, "moe.importance_mode=predicted", "moe.budget=running",
                      "model.hidden_dropout=0.0")
    if route_on_attention:  # the negative control: causal attention-received routing (refused by validation)
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, importance_mode="attention_received"))
    signals = []
    real_importance = DynamicMoE._importance

    def recording(self, x_TD, tokens):
        s_T, loss = real_importance(self, x_TD, tokens)
        signals.append(s_T.view(-1, 2))  # [s, b]: b = 0 and 1 are the two sequences
        return s_T, loss

    DynamicMoE._importance = recording
    groups = initialize(cfg.parallel, cfg.train.seed)
    model = build_model(cfg, 500, groups)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 500, (1, 32), generator=gen).repeat(2, 1)
    tokens[1, 12:] = torch.randint(0, 500, (20,), generator=gen)
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool).triu(1)
    diffs = {}
    for mode in ("train", "eval"):
        if route_on_attention and mode == "eval":
            continue  # attention-received routing needs the training-time statistics here
        model.train(mode == "train")
        signals.clear()
        with torch.no_grad():
            logits = model(tokens, torch.arange(32).expand(2, -1), mask)
        diffs[f"{mode} outputs"] = (logits[0, :12] - logits[1, :12]).abs().max().item()
        diffs[f"{mode} routing signal"] = max((s[:12, 0] - s[:12, 1]).abs().max().item() for s in signals)
    return diffs


def test_predicted_mode_never_looks_ahead(tiny_data):
    diffs = spawn(_prefix_outputs, 1, tiny_data, False)[0]
    print("positions <= 11, later tokens changed:", diffs)
    assert all(value == 0.0 for value in diffs.values()), diffs


def test_routing_on_causal_attention_received_would_look_ahead(tiny_data):
    """The negative control of the test above: the refused configuration routes on the future."""
    diffs = spawn(_prefix_outputs, 1, tiny_data, True)[0]
    print("negative control, positions <= 11, later tokens changed:", diffs)
    assert diffs["train routing signal"] > 0.0
