"""The all-to-all traffic meter (planner validation, benchmarks): nested meters each count their own block."""

from __future__ import annotations

from megamoe.parallel import comm


def _active() -> list[int]:
    return [id(meter) for meter in comm._METERS]


def test_leaving_a_nested_meter_removes_that_meter():
    with comm.metered() as outer:
        with comm.metered() as inner:
            assert _active() == [id(outer), id(inner)]
        assert _active() == [id(outer)], "leaving the inner block removed another meter (equal counts)"
    assert _active() == []
