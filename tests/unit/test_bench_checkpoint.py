"""tools/bench_checkpoint.py's arithmetic and its model (the launches themselves are what the tool is for; tests
never time anything)."""

from __future__ import annotations

import pytest

from megamoe.studies.bench_checkpoint import MODEL, SaveTimes, table
from tests.helpers import ROOT, load_tool


def test_the_table_gives_each_mode_its_median_stall_and_the_ratio_to_synchronous_saves():
    sync = SaveTimes("sync", 81_801_984, [3.0, 3.6, 3.2], 1 << 30, 43.6)
    background = SaveTimes("async", 81_801_984, [0.6, 0.5, 0.4], 1 << 30, 39.3)
    lines = table(sync, background).splitlines()
    assert lines[2] == "| sync | 3.20 | 3.00, 3.60, 3.20 | 1.00 | 43.6 |"
    assert lines[3] == "| async | 0.50 | 0.60, 0.50, 0.40 | 0.16 | 39.3 |"


def test_the_model_is_large_enough_for_saves_to_matter():
    """At least 50 M parameters (embeddings left out): 8 layers of attention and a SwiGLU FFN at d = 768."""
    from megamoe.config import load
    from megamoe.moe import plan

    cfg = load(str(ROOT / "configs" / "tiny-dense.yaml"), MODEL)  # the tool's base config
    layout = plan.ClusterLayout(world_size=2, tp=1, pp=1, ep=1)
    sized = plan.dataclasses.replace(cfg, model=plan.dataclasses.replace(cfg.model, vocab_size=32))
    dense, experts = plan.stage_params(sized, layout, 0)
    assert dense + experts > 50_000_000 and "deepspeed.zero_stage=2" in MODEL


def test_too_few_steps_measure_no_save():
    with pytest.raises(SystemExit):
        load_tool("bench_checkpoint").main(["--steps", "4"])
