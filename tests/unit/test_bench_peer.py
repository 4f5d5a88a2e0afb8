"""The PEER benchmark library on a tiny layer: complete records from fresh processes, ratios, failures reported
instead of raised. No timing is asserted."""

from __future__ import annotations

import importlib.util
import multiprocessing

import pytest

from megamoe.studies import bench_peer

TINY = bench_peer.PEERBenchConfig(num_tokens=32, hidden_size=16, num_heads=2, topk_per_head=4, key_dim=8,
                                  chunk_tokens=16, warmup=0, iters=1, threads=1)
HAVE_PEER_PYTORCH = importlib.util.find_spec("PEER_pytorch") is not None


@pytest.fixture(scope="module")
def records() -> list[bench_peer.PEERRecord]:
    impls = list(bench_peer.IMPLS) if HAVE_PEER_PYTORCH else ["megamoe"]
    return bench_peer.run([16], impls, TINY)


def check_complete(r: bench_peer.PEERRecord, impl: str) -> None:
    assert r.error is None, r.error
    assert (r.impl, r.N, r.T, r.d, r.heads, r.k, r.d_k) == (impl, 256, 32, 16, 2, 4, 8)
    assert r.fwd_bwd_s > 0 and r.fwd_bwd_min_s > 0 and r.per_token_us == pytest.approx(1e6 * r.fwd_bwd_s / 32)
    assert 0 < r.model_rss_gb <= r.peak_rss_gb and r.working_rss_gb == pytest.approx(r.peak_rss_gb - r.model_rss_gb)
    assert r.scaling_vs_smallest_N == 1.0 and r.threads == 1 and r.num_params > 2 * 256 * 16
    assert r.timing == {"warmup": 0, "iters": 1}


def test_megamoe_record_is_complete(records):
    check_complete(records[0], "megamoe")
    r = records[0]
    assert r.flop_floor_s > 0 and r.memory_floor_s > 0
    assert r.over_floor == pytest.approx(r.fwd_bwd_s / max(r.flop_floor_s, r.memory_floor_s))


def test_the_floors_count_the_work_every_implementation_must_do():
    """At the issue's size (T=4096, d=256, h=8, k=16, d_k=128, N=1024^2): the query projection (1.07 G
    multiply-adds), the sub-key scores (4.29 G) and the experts (0.27 G), x3 for the backward, x2 FLOPs each:
    ~34 GFLOP. Bytes: 524,288 copies x 1 KiB rows x 2 tables x (gather, gather again, read + write of the
    scatter-add) + two 1 GiB gradient tables."""
    cfg = bench_peer.PEERBenchConfig()
    assert bench_peer.peer_flops(1024 ** 2, cfg) == 2 * 3 * (4096 * 256 * 1024 + 4096 * 8 * 2 * 1024 * 64
                                                               + 4096 * 8 * 16 * 2 * 256)
    assert 33e9 < bench_peer.peer_flops(1024 ** 2, cfg) < 35e9
    assert bench_peer.peer_bytes(1024 ** 2, cfg) == 4096 * 128 * 1024 * 2 * 4 + 2 * 1024 ** 2 * 1024


def test_peer_pytorch_record_and_the_ratios(records):
    pytest.importorskip("PEER_pytorch")
    ours, theirs = records
    check_complete(theirs, "peer-pytorch")
    for r in records:
        assert r.megamoe_over_peer_pytorch_time == pytest.approx(ours.fwd_bwd_s / theirs.fwd_bwd_s)
        assert r.megamoe_over_peer_pytorch_memory == pytest.approx(ours.peak_rss_gb / theirs.peak_rss_gb)
    table = bench_peer.format_table(records)
    assert "| 16^2 | megamoe | " in table and "| 16^2 | peer-pytorch | " in table
    assert "| N | time megamoe / PEER-pytorch |" in table and "PEER-pytorch differs" in table


def test_a_failing_case_becomes_an_error_record():
    """The case entry point catches the failure (here a non-square N, or PEER-pytorch missing) and sends it."""
    recv_conn, send_conn = multiprocessing.Pipe(duplex=False)
    bench_peer._case_main(send_conn, "peer-pytorch", 15, TINY)
    failed = recv_conn.recv()
    assert failed.error and failed.fwd_bwd_s is None and failed.impl == "peer-pytorch"
    bench_peer.add_ratios([failed])
    assert "| 3^2 | peer-pytorch |" + " |" * 11 + " failed: " in bench_peer.format_table([failed])


@pytest.mark.parametrize("sides, impls, cfg, message", [
    ([16], ["tutel"], TINY, "implementation 'tutel' is unknown"),
    ([2], ["megamoe"], TINY, r"--sides 2 gives sqrt\(N\) < k=4"),
    ([16], ["megamoe"], bench_peer.PEERBenchConfig(key_dim=7), "--key-dim 7 and --dim 256 must be even"),
])
def test_command_line_mistakes_name_the_fix(sides, impls, cfg, message):
    with pytest.raises(ValueError, match=message):
        bench_peer.validate_peer_bench(sides, impls, cfg)
