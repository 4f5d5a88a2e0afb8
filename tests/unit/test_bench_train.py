"""tools/bench_train.py's arithmetic: ratios to the dense run of the same size, the table (the launches themselves
are what the tool is for; tests never time anything)."""

from __future__ import annotations

import math

from megamoe.studies.bench_train import SIZES, TrainThroughput, relative_to_dense, runs, table


def test_ratios_are_to_the_dense_run_of_the_same_size():
    results = relative_to_dense([
        TrainThroughput("demo", "dense", 1000.0, 0.1, 0.3, 0.1), TrainThroughput("demo", "top2 EP=1", 800.0, 0.08,
                                                                                 0.24, 0.12),
        TrainThroughput("small", "top2 EP=2", 50.0, 0.01, 0.1, 2.0)])
    assert [r.vs_dense for r in results[:2]] == [1.0, 0.8] and math.isnan(results[2].vs_dense)
    assert "| demo | top2 EP=1 | 800 | 0.80 | 0.120 | 0.080 | 24.0 % |" in table(results)


def test_the_moe_runs_keep_the_dense_active_ffn():
    """8 experts of half the dense width, top-2: the dense FFN's active width at every size."""
    for size in SIZES.values():
        overrides = dict(o.split("=") for o in runs(size["ffn"])["top2 EP=1"])
        assert int(overrides["moe.router_topk"]) * int(overrides["moe.ffn_hidden_size"]) == size["ffn"]
