"""The multi-process helper every parallel test stands on: ranks see the caller's environment, share nothing else
with each other, and a failing rank fails the call."""

from __future__ import annotations

import pytest

from tests.helpers import spawn


def _rank_view() -> tuple[str | None, str, float]:
    import os
    import sys

    import torch

    torch.manual_seed(int(os.environ["RANK"]))
    sys.modules["megamoe"].rank_was_here = True  # what one rank changes, another must not see
    return os.environ.get("MEGAMOE_SPAWN_PROBE"), os.environ["WORLD_SIZE"], torch.rand(1).item()


def _peek_changed_module() -> bool:
    import sys

    return hasattr(sys.modules["megamoe"], "rank_was_here")


def _fail_on_rank_1() -> None:
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("rank 1 is broken")


def test_ranks_see_the_callers_environment_and_nothing_of_each_other(monkeypatch):
    monkeypatch.setenv("MEGAMOE_SPAWN_PROBE", "first")
    first = spawn(_rank_view, 2, timeout=60)
    monkeypatch.setenv("MEGAMOE_SPAWN_PROBE", "second")
    second = spawn(_rank_view, 1, timeout=60)
    assert [view[:2] for view in first] == [("first", "2"), ("first", "2")]
    assert second[0][:2] == ("second", "1")
    assert first[0][2] != first[1][2] and second[0][2] == first[0][2]  # each rank's RNG is its own
    assert spawn(_peek_changed_module, 1, timeout=60) == [False]


def test_a_failing_rank_fails_the_call_with_its_error():
    with pytest.raises(RuntimeError, match="rank 1 failed:(.|\n)*rank 1 is broken"):
        spawn(_fail_on_rank_1, 2, timeout=60)
