"""The MoE benchmark library on a tiny layer: records are complete; no timing is asserted."""

from __future__ import annotations

import pytest

from megamoe.parallel.groups import ParallelGroups
from megamoe.studies import bench

TINY = bench.BenchShape(num_tokens=64, hidden_size=32, ffn_hidden_size=64, num_experts=4, topk=2)


@pytest.fixture(scope="module")
def records() -> list[bench.BenchRecord]:
    return bench.bench_shape("tiny", TINY, ["megamoe-loop", "megamoe-grouped"], ParallelGroups.single_process(),
                             bench.Timing(warmup=0, iters=1), seed=3)


def test_one_record_per_implementation_plus_the_floor(records):
    assert [r.impl for r in records] == ["floor", "megamoe-loop", "megamoe-grouped"]
    for r in records:
        assert r.config == {"name": "tiny", "T": 64, "D": 32, "ffn": 64, "E": 4, "k": 2, "EP": 1}
        assert r.fwd_bwd_s > 0 and r.floor_s > 0 and r.floor_balanced_s > 0 and r.ratio_to_floor > 0


def test_grouped_experts_compute_what_the_loop_computes(records):
    assert records[2].rel_diff is not None and records[2].rel_diff < 1e-5


def test_single_process_moves_no_bytes_between_ranks(records):
    for r in records:
        assert r.a2a_bytes == r.ideal_a2a_bytes == r.dedup_a2a_bytes == 0
        assert r.ideal_a2a_bytes_with_local == 64 * 2 * 32 * 4  # T * k copies of D fp32 values


def test_the_table_names_the_faster_expert_path(records):
    table = bench.format_table(records)
    assert table.count("| tiny | 1 |") == 3
    assert "tiny: megamoe " in table and " is faster " in table


@pytest.mark.parametrize("args, message", [
    ((["huge"], ["megamoe-loop"], 1, 1), "configuration 'huge' is unknown"),
    ((["coarse"], ["tutel"], 1, 1), "implementation 'tutel' is unknown"),
    ((["coarse"], ["megamoe-loop"], 2, 1), r"--ep 2 needs 2 ranks but WORLD_SIZE=1"),
    ((["coarse"], ["megamoe-loop"], 3, 3), r"E=8, T=4096: both must be divisible by --ep 3"),
])
def test_command_line_mistakes_name_the_fix(args, message):
    with pytest.raises(ValueError, match=message):
        bench.validate_bench(*args)
