"""A resume under another layout continues with the optimizer state (train/reshard.py): train 4 steps at layout A,
save, continue 3 steps at layout B; steps 5-7 equal those of 7 uninterrupted steps at A (fp32, 2 CPU ranks).
Without the re-cut optimizer state the same resume restarts Adam's moments and the losses part at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_training, spawn

SAVED, MORE = 4, 3
TOLERANCE = 1e-6
MODELS = {"topk": ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64"],
          # Tables row-sharded by expert parallelism. Query LayerNorm: BatchNorm normalises over the tokens of the
          # expert-parallel group, so another EP size is another model (its statistics see other batches).
          "peer": ["moe.variant=peer", "moe.num_experts=256", "moe.num_heads=2", "moe.topk_per_head=4",
                   "moe.key_dim=16", "moe.query_norm=layernorm"],
          "mpoe": ["moe.variant=mpo", "moe.num_experts=4", "moe.ffn_hidden_size=48", "moe.aux_init_noise_std=0.02"]}
ZERO2 = ("deepspeed.zero_stage=2",)
EP2 = ("parallel.expert_model_parallel_size=2", *ZERO2)  # stage 0 would clip with per-rank norms
TP2 = ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
PP2 = ("parallel.pipeline_model_parallel_size=2", *ZERO2)
# name: (layout A, layout B, ranks at B); A on 2 ranks (the rest is data parallel), global batch 8.
CHANGES = {
    "ep2_to_ep1": (EP2, ZERO2, 2),
    "ep1_to_ep2": (ZERO2, EP2, 2),
    "tp2_to_tp1": (TP2, (), 2),
    "pp2_to_pp1": (PP2, ZERO2, 2),
    "zero2_dp2_to_dp1": (ZERO2, ZERO2, 1),
}
CASES = {f"{model}_{change}": (MODELS[model], *CHANGES[change]) for model in MODELS for change in CHANGES}
CASES["topk_zero2_to_zero0"] = (MODELS["topk"], ZERO2, (), 2)
# ZeRO-3 keeps its parameters inside DeepSpeed's optimizer: its checkpoints are DeepSpeed's own, resumed at their
# layout (and megamoe's MoE layers do not train under ZeRO-3: the dense model).
CASES["dense_zero3_same_layout"] = ([], ("deepspeed.zero_stage=3",), ("deepspeed.zero_stage=3",), 2)


def _train(data: dict, log_dir: str, steps: int, overrides: tuple[str, ...]) -> None:
    run_training(data, f"logging.log_dir={log_dir}", f"train.train_iters={steps}", "train.global_batch_size=8",
                 "train.lr_warmup_iters=2", "train.lr=3e-3", *overrides)


def _losses(log_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _resume_parity(data: dict, tmp: Path, model: list[str], layout_a: tuple, layout_b: tuple, ranks_b: int,
                   drop_optimizer: bool = False) -> dict[int, tuple[float, float]]:
    """{step: (resumed at B, uninterrupted at A)} for the steps after the save."""
    saved, ckpt = tmp / "saved", tmp / "ckpt"
    spawn(_train, 2, data, str(tmp / "full"), SAVED + MORE,
          (*model, *layout_a, f"checkpoint.save={saved}", f"checkpoint.save_interval={SAVED}"))
    # A run that stopped after step SAVED: its checkpoint directory holds that step's checkpoint only.
    shutil.copytree(saved / f"iter_{SAVED:07d}", ckpt / f"iter_{SAVED:07d}")
    (ckpt / "latest").write_text(f"iter_{SAVED:07d}")
    if drop_optimizer:
        from megamoe.train.checkpoint import RESHARD_DIR

        shutil.rmtree(ckpt / f"iter_{SAVED:07d}" / RESHARD_DIR)
    spawn(_train, ranks_b, data, str(tmp / "resumed"), SAVED + MORE,
          (*model, *layout_b, f"checkpoint.load={ckpt}", "checkpoint.verify=none"))
    full, resumed = _losses(tmp / "full"), _losses(tmp / "resumed")
    assert sorted(resumed) == list(range(SAVED + 1, SAVED + MORE + 1)), sorted(resumed)
    return {step: (resumed[step], full[step]) for step in resumed}


def _max_rel(pairs: dict[int, tuple[float, float]]) -> float:
    return max(abs(got - want) / abs(want) for got, want in pairs.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_at_another_layout_continues_the_optimizer(tiny_data, tmp_path, case):
    pairs = _resume_parity(tiny_data, tmp_path, *CASES[case])
    print(f"{case}: steps {SAVED + 1}-{SAVED + MORE} resumed vs uninterrupted {pairs}, max rel {_max_rel(pairs):.2e}")
    assert _max_rel(pairs) <= TOLERANCE, pairs


def test_without_the_optimizer_state_the_resume_departs(tiny_data, tmp_path):
    """The comparison's power: the same resume with Adam restarting is far outside the tolerance."""
    pairs = _resume_parity(tiny_data, tmp_path, *CASES["topk_ep2_to_ep1"], drop_optimizer=True)
    print(f"optimizer restarted: {pairs}, max rel {_max_rel(pairs):.2e}")
    assert _max_rel(pairs) > 1000 * TOLERANCE, pairs
