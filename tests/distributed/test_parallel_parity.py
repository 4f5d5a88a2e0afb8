"""Parallel layouts against the single-process run: TP=2, DP=2 and ZeRO 1/2/3 (3 steps, fp32, gloo).

One spawn computes the single-process reference (micro-batch 8); one 2-rank spawn runs every layout in
turn (TP=2 with micro-batch 8; DP=2 with micro-batch 4 at ZeRO 0, 1, 2 and 3) from the same seed, so the
same initial weights and the same global batches.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import spawn, tiny_config

STEPS = 3
REFERENCE = ("reference", ["train.micro_batch_size=8"])
LAYOUTS = [
    ("tp2", ["train.micro_batch_size=8", "parallel.tensor_model_parallel_size=2"]),
    ("tp2_sp", ["train.micro_batch_size=8", "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true"]),
    ("dp2_zero0", ["train.micro_batch_size=4", "deepspeed.zero_stage=0"]),
    ("dp2_zero1", ["train.micro_batch_size=4", "deepspeed.zero_stage=1"]),
    ("dp2_zero2", ["train.micro_batch_size=4", "deepspeed.zero_stage=2"]),
    ("dp2_zero3", ["train.micro_batch_size=4", "deepspeed.zero_stage=3"]),
]


def _train(data: dict, runs: list[tuple[str, list[str]]]) -> dict:
    """Per run: initial full weights, the 3 losses, and (ZeRO 0) the full gradients of every step."""
    import torch.distributed as dist

    from megamoe.data.loader import build_loader
    from megamoe.models.sharding import full_state_dict
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, train_step

    out = {}
    for name, overrides in runs:
        cfg = tiny_config(data, *overrides)
        trainer = build_trainer(cfg, startup.check(cfg))
        capture = cfg.deepspeed.zero_stage == 0
        params0 = full_state_dict(trainer.engine.module, trainer.groups) if capture else None
        batches = iter(build_loader(trainer.datasets.train, 0, cfg, trainer.groups))
        grads, losses = [], []

        def keep_grads(engine, grads=grads, groups=trainer.groups):
            grads.append(full_state_dict(engine.module, groups, grads=True))

        for _ in range(STEPS):
            losses.append(train_step(trainer, batches, keep_grads if capture else None)["train/loss"])
        out[name] = {"losses": losses, "grads": grads, "params0": params0}
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def results(tiny_data) -> dict:
    reference = spawn(_train, 1, tiny_data, [REFERENCE])[0]
    layouts = spawn(_train, 2, tiny_data, LAYOUTS)[0]
    return {**reference, **layouts}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_losses_match(losses: list[float], reference: list[float], tol: float = 1e-5) -> None:
    for step, (got, want) in enumerate(zip(losses, reference, strict=True), 1):
        assert abs(got - want) / abs(want) <= tol, f"step {step}: loss {got} vs reference {want}"


def _assert_grads_match(grads: list[dict], reference: list[dict], tol: float = 1e-5) -> None:
    for step, (got, want) in enumerate(zip(grads, reference, strict=True), 1):
        assert got.keys() == want.keys()
        for name in want:
            assert _rel(got[name], want[name]) <= tol, f"step {step} {name}: rel {_rel(got[name], want[name])}"


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "dp2_zero0"])
def test_layout_matches_single_process(results, layout):
    ref, run = results["reference"], results[layout]
    for name, tensor in ref["params0"].items():  # same starting point: the model is TP-size invariant
        torch.testing.assert_close(run["params0"][name], tensor, rtol=0, atol=0)
    _assert_losses_match(run["losses"], ref["losses"])
    _assert_grads_match(run["grads"], ref["grads"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_zero0(results, stage):
    _assert_losses_match(results[f"dp2_zero{stage}"]["losses"], results["dp2_zero0"]["losses"])


def test_training_moves(results):
    losses = results["reference"]["losses"]
    assert losses[-1] < losses[0], f"loss did not fall over {STEPS} steps: {losses}"
