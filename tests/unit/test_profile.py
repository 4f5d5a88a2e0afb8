"""The step profiler's attribution: an operator's time goes to its innermost region, a backward operator to the
region whose forward created it, host reads are counted where they happen (megamoe/train/profile.py)."""

from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from megamoe.moe import host
from megamoe.moe.host import read_on_host
from megamoe.profiling import region
from megamoe.train.profile import breakdown


def profiled_step(lin_a: torch.nn.Linear, lin_b: torch.nn.Linear, x: torch.Tensor):
    with region("forward"):
        with region("a"):
            h = lin_a(x)
        with region("b"):
            y = lin_b(h).relu().sum()
    with region("backward"):
        y.backward()
    with region("optimizer"):
        read_on_host(y.detach(), "a test's read")
        torch.nonzero(x[0] > 0)
        bool(x[0, 0] > 0)


def test_backward_time_follows_the_forward_region_and_syncs_are_counted():
    torch.manual_seed(0)
    lin_a, lin_b, x = torch.nn.Linear(64, 256), torch.nn.Linear(256, 8), torch.randn(512, 64)
    reads_before = Counter(host.READS)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            profiled_step(lin_a, lin_b, x)
    result = breakdown(prof.events(), steps=2, door_reads=host.READS - reads_before)
    parts = {row["part"]: row for row in result["parts_ms"]}
    for part in ("a", "b"):
        assert parts[part]["forward"] > 0 and parts[part]["backward"] > 0, parts[part]
        assert "aten::mm" in parts[part]["top_ops_ms"] or "aten::addmm" in parts[part]["top_ops_ms"]
    # Without the sequence numbers every backward GEMM would stay in the backward region itself.
    assert not {"aten::mm", "aten::addmm"} & set(parts["backward"]["top_ops_ms"]), parts["backward"]
    assert result["host_syncs_per_step"] == 3.0
    assert [(row["where"], row["op"].split(" under ")[0], row["per_step"]) for row in result["host_syncs"]] == [
        ("MoE layers", "read_on_host: a test's read", 1.0), ("optimizer (other)", "aten::nonzero", 1.0),
        ("optimizer (other)", "aten::is_nonzero", 1.0)]
