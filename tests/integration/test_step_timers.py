"""logging.step_timers in a real 2-process run: every logged step has its parts, DeepSpeed's gradient reduction
among them, and the parts add up to the step's wall time measured by the loop itself."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_training, spawn

PARTS = ("data", "forward", "backward", "grad_reduction", "optimizer", "other")


def _train(data: dict, log_dir: str) -> None:
    run_training(data, "moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
                 "train.global_batch_size=16", "train.train_iters=4", "logging.step_timers=true",
                 f"logging.log_dir={log_dir}")


def test_each_logged_step_is_split_into_its_parts(tiny_data, tmp_path):
    spawn(_train, 2, tiny_data, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/step_s" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        parts_ms = {p: r[f"time/{p}_ms"] for p in PARTS}
        assert all(ms >= 0.0 for ms in parts_ms.values()), parts_ms
        assert parts_ms["grad_reduction"] > 0.0 and parts_ms["forward"] > 0.0 and parts_ms["backward"] > 0.0
        # The timers' step is train_step alone; the loop's step_s adds a few bookkeeping lines around it.
        assert sum(parts_ms.values()) == pytest.approx(1e3 * r["train/step_s"], rel=0.05), (parts_ms, r)
