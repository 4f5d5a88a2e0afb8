"""Save at step 10, resume in a new launch: steps 11-20 give bit-identical losses to an uninterrupted run.

Runs the real entry point (`deepspeed --num_gpus 2 launchers/pretrain.py`) with ZeRO-2, DP=2 and dropout
on, so data position, optimizer/scheduler state and every RNG stream must be restored; for the MoE model
with EP=2 also each rank's experts (from megamoe's expert shards: DeepSpeed's file holds rank 0's only); with
PP=2 each stage's own files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import launch_command, run_launch

LAUNCH_TIMEOUT_S = 300


def launch(data: dict, log_dir: Path, *overrides: str) -> list[dict]:
    """Run the tiny model through the deepspeed launcher on 2 CPU ranks; return metrics.jsonl records."""
    run_launch(launch_command(data, log_dir, "train.train_iters=20", "train.eval_interval=10", *overrides),
               LAUNCH_TIMEOUT_S)
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


MODELS = {"dense": [], "moe_ep2": ["moe.num_experts=4", "moe.ffn_hidden_size=64",
                                   "parallel.expert_model_parallel_size=2",
                                   "moe.router_enable_expert_bias=true"],
          "moe_pp2": ["moe.num_experts=4", "moe.ffn_hidden_size=64", "parallel.pipeline_model_parallel_size=2",
                      "moe.router_enable_expert_bias=true"]}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_resume_continues_the_same_loss_sequence(tiny_data, tmp_path, model):
    full_ckpt = tmp_path / "full_ckpt"
    full = launch(tiny_data, tmp_path / "full", f"checkpoint.save={full_ckpt}", "checkpoint.save_interval=10",
                  *MODELS[model])
    assert (full_ckpt / "iter_0000010" / "config.yaml").is_file()

    # A run that died after step 10: its checkpoint directory holds only the step-10 checkpoint.
    resume_ckpt = tmp_path / "resume_ckpt"
    shutil.copytree(full_ckpt / "iter_0000010", resume_ckpt / "iter_0000010")
    (resume_ckpt / "latest").write_text("iter_0000010")
    resumed = launch(tiny_data, tmp_path / "resumed", f"checkpoint.load={resume_ckpt}", *MODELS[model])

    want, got = train_losses(full), train_losses(resumed)
    assert sorted(got) == list(range(11, 21)), f"resumed run logged steps {sorted(got)}"
    for step in range(11, 21):
        assert got[step] == want[step], f"step {step}: resumed {got[step]!r} vs uninterrupted {want[step]!r}"
    print("uninterrupted steps 11-20:", [want[s] for s in range(11, 21)])
    print("resumed       steps 11-20:", [got[s] for s in range(11, 21)])
