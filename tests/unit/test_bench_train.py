"""tools/bench_train.py's arithmetic: ratios to the dense run of the same size, the tables, the runs at equal active
FFN width (the launches themselves are what the tool is for; tests never time anything)."""

from __future__ import annotations

import math

from megamoe.studies import bench_train
from megamoe.studies.bench_train import SIZES, TrainThroughput, breakdown_table, relative_to_dense, runs, table


def test_ratios_are_to_the_dense_run_of_the_same_size():
    results = relative_to_dense([
        TrainThroughput("demo", "dense", 1000.0, 0.1, 0.3, 0.1), TrainThroughput("demo", "top2 EP=1", 800.0, 0.08,
                                                                                 0.24, 0.12),
        TrainThroughput("small", "top2 EP=2", 50.0, 0.01, 0.1, 2.0)])
    assert [r.vs_dense for r in results[:2]] == [1.0, 0.8] and math.isnan(results[2].vs_dense)
    assert "| demo | top2 EP=1 | 800 | 0.80 | 0.120 | 0.080 | 24.0 % |" in table(results)


def test_the_moe_runs_keep_the_dense_active_ffn():
    """top-2 over experts of half the dense width; top-4 over 2/11 of it plus a shared expert of 3/11."""
    for size, spec in SIZES.items():
        named = runs(size)
        for name in ("top2 EP=1", "top2 EP=2", "fine-grained EP=1", "fine-grained EP=2"):
            overrides = dict(o.split("=") for o in named[name])
            active = int(overrides["moe.router_topk"]) * int(overrides["moe.ffn_hidden_size"])
            assert active + int(overrides.get("moe.shared_expert_intermediate_size", 0)) == spec["ffn"], (size, name)
        assert [o for o in named["top2 EP=2"] if o not in named["top2 EP=1"]] == [
            "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"]


def test_the_demo_size_runs_every_variant():
    from megamoe import variants

    chosen = " ".join(" ".join(overrides) for overrides in runs("demo").values())
    assert all(f"moe.variant={name}" in chosen for name in variants.VARIANTS if name != "topk")
    assert not any("masked_lm" in o for overrides in runs("demo").values() for o in overrides)


def test_the_breakdown_sums_parts_into_columns_and_keeps_the_rest_as_other():
    profile = {"step_ms": 10.0, "host_syncs_per_step": 3.0, "parts_ms": [
        {"part": "attention", "total": 2.0}, {"part": "moe/experts", "total": 3.0}, {"part": "mlp slot", "total": 0.5},
        {"part": "moe/all_to_all", "total": 1.0}, {"part": "unmarked", "total": 0.25}]}
    row = breakdown_table([TrainThroughput("demo", "top2 EP=2", 1.0, 0.0, 0.0, 0.01, profile=profile)])
    cells = row.splitlines()[-1].split(" | ")
    header = row.splitlines()[0].split(" | ")
    value = dict(zip(header, cells, strict=True))
    assert (value["attention"], value["FFN / experts"], value["all-to-all"], value["other"]) == (
        "2.0", "3.5", "1.0", "0.2")
    assert value["host syncs |"] == "3 |"


def test_the_ceiling_takes_only_the_extra_parameter_time_over_dense():
    def timed(**ms: float) -> dict:
        return {"data": 1.0, "forward": 30.0, "backward": 50.0, "grad_reduction": 10.0, "optimizer": 5.0,
                "other": 4.0} | ms

    dense = TrainThroughput("demo", "dense", 1.0, 0.0, 0.0, 0.100, timers_ms=timed())
    # 30 ms more, of which 15 in the parameter parts: with layers as fast as dense's MLP, 100 / 115 of dense.
    moe = TrainThroughput("demo", "top2 EP=1", 1.0, 0.0, 0.0, 0.130,
                          timers_ms=timed(forward=38.0, backward=57.0, grad_reduction=20.0, optimizer=10.0))
    untimed = TrainThroughput("small", "top2 EP=1", 1.0, 0.0, 0.0, 1.0)
    lines = bench_train.timers_table([dense, moe, untimed]).splitlines()
    assert len(lines) == 4  # header, rule, the two timed runs
    assert lines[2] == "| demo | dense | 100.0 | 1.0 | 30.0 | 50.0 | 10.0 | 5.0 | 4.0 |  |"
    assert lines[3] == f"| demo | top2 EP=1 | 130.0 | 1.0 | 38.0 | 57.0 | 20.0 | 10.0 | 4.0 | {100 / 115:.2f} |"
