"""Parallel layouts against the single-process run: TP=2 (also with Qwen's attention: q/k/v biases and per-head
q/k norms), DP=2, ZeRO 1/2/3, accumulation (5 steps, gloo).

One spawn computes the single-process references (micro-batch 8; and 2 x 4 with accumulation); one 2-rank
spawn runs every layout in turn (TP=2 with micro-batch 8; DP=2 with micro-batch 4 at ZeRO 0-3, fp32 and
bf16) from the same seed, so the same initial weights and the same global batches. Clipping is always
active (clip_grad 0.05 is below every step's norm), so every layout must also agree on the global norm.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import spawn, tiny_config

STEPS = 5
COMMON = ["train.train_iters=5", "train.clip_grad=0.05"]
QWEN_ATTENTION = ["model.qk_layernorm=true", "model.add_qkv_bias=true"]  # per-head norms: partial gradients under TP
REFERENCES = [("reference", ["train.micro_batch_size=8"]),
              ("gas2", ["train.micro_batch_size=4", "train.global_batch_size=8"]),
              ("qwen_attention", ["train.micro_batch_size=8", *QWEN_ATTENTION])]
LAYOUTS = [
    ("tp2", ["train.micro_batch_size=8", "parallel.tensor_model_parallel_size=2"]),
    ("tp2_sp", ["train.micro_batch_size=8", "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true"]),
    ("tp2_qwen_attention", ["train.micro_batch_size=8", "parallel.tensor_model_parallel_size=2", *QWEN_ATTENTION]),
    ("dp2_zero0", ["train.micro_batch_size=4", "deepspeed.zero_stage=0"]),
    ("dp2_zero1", ["train.micro_batch_size=4", "deepspeed.zero_stage=1"]),
    ("dp2_zero2", ["train.micro_batch_size=4", "deepspeed.zero_stage=2"]),
    ("dp2_zero3", ["train.micro_batch_size=4", "deepspeed.zero_stage=3"]),
    ("dp2_bf16_zero0", ["train.micro_batch_size=4", "train.bf16=true", "deepspeed.zero_stage=0"]),
    ("dp2_bf16_zero2", ["train.micro_batch_size=4", "train.bf16=true", "deepspeed.zero_stage=2"]),
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
        cfg = tiny_config(data, *COMMON, *overrides)
        trainer = build_trainer(cfg, startup.check(cfg))
        capture = cfg.deepspeed.zero_stage == 0 and not cfg.train.bf16
        params0 = full_state_dict(trainer.engine.module, trainer.groups) if capture else None
        batches = iter(build_loader(trainer.datasets.train, 0, cfg, trainer.groups))
        grads, losses, norms = [], [], []

        def keep_grads(engine, grads=grads, groups=trainer.groups):
            grads.append(full_state_dict(engine.module, groups, grads=True))

        for _ in range(STEPS):
            values = train_step(trainer, batches, keep_grads if capture else None)
            losses.append(values["train/loss"])
            norms.append(values["train/grad_norm"])
        out[name] = {"losses": losses, "grad_norms": norms, "grads": grads, "params0": params0}
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def results(tiny_data) -> dict:
    reference = spawn(_train, 1, tiny_data, REFERENCES)[0]
    layouts = spawn(_train, 2, tiny_data, LAYOUTS)[0]
    return {**reference, **layouts}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_losses_match(losses: list[float], reference: list[float], tol: float = 1e-5,
                         what: str = "loss") -> None:
    for step, (got, want) in enumerate(zip(losses, reference, strict=True), 1):
        assert abs(got - want) / abs(want) <= tol, f"step {step}: {what} {got} vs reference {want}"
    print(f"max rel {what} diff {max(abs(g - w) / abs(w) for g, w in zip(losses, reference, strict=True)):.2e}")


def _assert_grads_match(grads: list[dict], reference: list[dict], tol: float = 1e-5) -> None:
    worst = 0.0
    for step, (got, want) in enumerate(zip(grads, reference, strict=True), 1):
        assert got.keys() == want.keys()
        for name in want:
            rel = _rel(got[name], want[name])
            assert rel <= tol, f"step {step} {name}: rel {rel}"
            worst = max(worst, rel)
    print(f"max rel gradient diff over {len(grads)} steps x {len(reference[0])} tensors: {worst:.2e}")


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "dp2_zero0", "gas2", "tp2_qwen_attention"])
def test_layout_matches_single_process(results, layout):
    ref, run = results["qwen_attention" if layout.endswith("qwen_attention") else "reference"], results[layout]
    for name, tensor in ref["params0"].items():  # same starting point: the model is TP-size invariant
        torch.testing.assert_close(run["params0"][name], tensor, rtol=0, atol=0)
    _assert_losses_match(run["losses"], ref["losses"])
    _assert_losses_match(run["grad_norms"], ref["grad_norms"], what="grad norm")
    assert all(norm > 0.05 for norm in ref["grad_norms"]), "clipping must be active in every step"
    _assert_grads_match(run["grads"], ref["grads"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_zero0(results, stage):
    run, zero0 = results[f"dp2_zero{stage}"], results["dp2_zero0"]
    _assert_losses_match(run["losses"], zero0["losses"])
    _assert_losses_match(run["grad_norms"], zero0["grad_norms"], what="grad norm")


@pytest.mark.parametrize("layout", ["dp2_bf16_zero0", "dp2_bf16_zero2"])
def test_bf16_tracks_fp32(results, layout):
    """bf16 weights and activations with fp32 master weights: within bf16 rounding of the fp32 run."""
    _assert_losses_match(results[layout]["losses"], results["dp2_zero0"]["losses"], tol=1e-2)


def test_training_moves(results):
    losses = results["reference"]["losses"]
    assert losses[-1] < losses[0], f"loss did not fall over {STEPS} steps: {losses}"
