"""data.valid_data_path: held-out datasets validated whole, pooled and one by one, in an order fixed over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megamoe.config import ConfigError
from megamoe.data.preprocess import encode_corpus
from tests.helpers import run_training, spawn, tiny_config

MOE = ("moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64")


@pytest.fixture(scope="module")
def held_out(tiny_data, tmp_path_factory) -> dict[str, str]:
    """Two held-out sets cut from the test corpus by document: its first 40 and its last 40 documents."""
    root = tmp_path_factory.mktemp("held_out")
    lines = Path(tiny_data["corpus"]).read_text().splitlines(keepends=True)
    prefixes = {}
    for name, part in (("early", lines[:40]), ("late", lines[-40:])):
        (root / f"{name}.jsonl").write_text("".join(part))
        prefixes[name] = encode_corpus([str(root / f"{name}.jsonl")], tiny_data["tokenizer"], str(root / name)).prefix
    return prefixes


def _evaluate(data: dict, valid: list[str], seed: int) -> dict:
    import torch

    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, evaluate, evaluate_sets

    cfg = tiny_config(data, f"data.valid_data_path=[{', '.join(valid)}]", "train.eval_iters=3",
                      f"train.seed={seed}", *MOE)
    trainer = build_trainer(cfg, startup.check(cfg))
    first = {name: trainer.datasets.valid[name][0]["tokens"].tolist() for name in trainer.datasets.valid}
    grad_enabled = []
    trainer.engine.module.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    sets = evaluate_sets(trainer)
    values = evaluate(trainer)
    return {"values": values, "first": first, "train": len(trainer.datasets.train), "grad": set(grad_enabled),
            "sets": {name: (r.loss_sum, r.tokens, r.expert_load) for name, r in sets.items()},
            "train_of_split": {split: _train_samples(data, split) for split in ("100,0,0", "90,10,0")}}


def _train_samples(data: dict, split: str) -> int:
    from megamoe.data.loader import build_datasets
    from megamoe.data.tokenizer import load_tokenizer
    from megamoe.train import startup

    cfg = tiny_config(data, f"data.split={split}", "train.eval_iters=0")
    return len(build_datasets(cfg, startup.check(cfg), load_tokenizer(data["tokenizer"])).train)


def test_held_out_sets_are_reported_pooled_and_each(tiny_data, held_out):
    both = spawn(_evaluate, 1, tiny_data, [held_out["early"], held_out["late"]], 1)[0]
    values, sets = both["values"], both["sets"]
    assert both["grad"] == {False}  # evaluation builds no autograd graph
    assert set(sets) == {"early", "late"}
    (early_sum, early_tokens, early_load), (late_sum, late_tokens, _) = sets["early"], sets["late"]
    assert early_tokens == late_tokens == 3 * 4 * 32  # eval_iters x micro-batch x seq_length, every token predicted
    assert values["valid/early/loss"] == pytest.approx(early_sum / early_tokens, rel=1e-6)
    assert values["valid/late/ppl"] == pytest.approx(math.exp(late_sum / late_tokens), rel=1e-6)
    assert values["valid/loss"] == pytest.approx((early_sum + late_sum) / (early_tokens + late_tokens), rel=1e-6)
    assert values["valid/early/loss"] != values["valid/late/loss"]  # different documents, different losses
    # Each MoE layer's load over the set: a share per expert, summing to 1.
    assert sorted(early_load) == ["layer1", "layer2"] and all(
        len(share) == 4 and sum(share) == pytest.approx(1.0) for share in early_load.values()), early_load
    # One set alone is the same set: the pooled values are its own, with no per-set keys.
    alone = spawn(_evaluate, 1, tiny_data, [held_out["early"]], 1)[0]
    assert alone["values"]["valid/loss"] == pytest.approx(values["valid/early/loss"], rel=1e-6)
    assert "valid/early/loss" not in alone["values"]
    # Training reads all of data_path (data.split's 90 % is not applied): the samples of a 100 % split.
    whole, most = both["train_of_split"]["100,0,0"], both["train_of_split"]["90,10,0"]
    assert both["train"] == whole > most, both["train_of_split"]


def test_held_out_order_is_the_same_for_every_seed(tiny_data, held_out):
    runs = [spawn(_evaluate, 1, tiny_data, [held_out["early"], held_out["late"]], seed)[0] for seed in (1, 2)]
    assert runs[0]["first"] == runs[1]["first"]
    assert runs[0]["values"]["valid/loss"] != runs[1]["values"]["valid/loss"]  # other initialisations


@pytest.mark.parametrize("value, message", [
    ("[]", "data.valid_data_path is empty"),
    ("[0.5, {early}]", "'0.5' is a number; held-out sets take no weights"),
    ("[{early}, {early}]", "would both be reported as 'early'"),
    ("[{early}_missing]", "data.valid_data_path: '"),
])
def test_bad_held_out_sets_are_refused_before_anything_starts(tiny_data, held_out, value, message):
    from megamoe.train import startup

    cfg = tiny_config(tiny_data, f"data.valid_data_path={value.format(early=held_out['early'])}", "train.eval_iters=2")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(".", r"\.")):
        startup.check(cfg)


def test_held_out_losses_reach_the_metrics_file(tiny_data, held_out, tmp_path):
    """A training run through the launcher's loop logs valid/<name>/loss beside the pooled valid/loss."""
    got = spawn(_train_and_read_metrics, 1, tiny_data, [held_out["early"], held_out["late"]], str(tmp_path))[0]
    evaluations = [r for r in got if "valid/loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 3]
    assert all({"valid/early/loss", "valid/late/ppl"} <= set(r) for r in evaluations)


def _train_and_read_metrics(data: dict, valid: list[str], log_dir: str) -> list[dict]:
    run_training(data, f"data.valid_data_path=[{', '.join(valid)}]", "train.eval_iters=1", "train.eval_interval=2",
                 f"logging.log_dir={log_dir}")
    with open(f"{log_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]
