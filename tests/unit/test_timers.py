"""The step timers' arithmetic (megamoe/train/timers.py) on a clock the test moves: per-step means since the last
read, the gradient reduction taken out of the backward it runs in, the rest of the step as 'other'."""

from __future__ import annotations

import pytest
import torch

from megamoe.train import timers as timers_module
from megamoe.train.timers import StepTimers


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def one_step(timers: StepTimers, clock: Clock, reduction_s: float) -> None:
    def reduce_gradients() -> str:
        clock.now += reduction_s
        return "reduced"

    reduce_gradients = timers.wrap(reduce_gradients, "grad_reduction")
    with timers.part("step"):
        with timers.part("data"):
            clock.now += 0.5
        with timers.part("forward"):
            clock.now += 1.0
        with timers.part("backward"):
            clock.now += 2.0
            assert reduce_gradients() == "reduced"  # a wrapped function keeps its result
        clock.now += 0.25  # loss bookkeeping: in no part
        with timers.part("optimizer"):
            clock.now += 0.75


def test_parts_are_means_per_step_and_the_reduction_leaves_the_backward(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(timers_module.time, "perf_counter", clock)
    timers = StepTimers(True, torch.device("cpu"))
    one_step(timers, clock, reduction_s=1.0)
    one_step(timers, clock, reduction_s=3.0)
    assert timers.pop() == {"time/data_ms": 500.0, "time/forward_ms": 1000.0, "time/backward_ms": 2000.0,
                            "time/grad_reduction_ms": 2000.0, "time/optimizer_ms": 750.0, "time/other_ms": 250.0}
    one_step(timers, clock, reduction_s=0.5)  # a read starts afresh
    assert timers.pop()["time/grad_reduction_ms"] == pytest.approx(500.0)
    assert timers.pop() == {}  # no step since


def test_disabled_timers_read_no_clock_and_report_nothing(monkeypatch):
    def no_clock() -> float:
        raise AssertionError("a disabled timer read the clock")

    monkeypatch.setattr(timers_module.time, "perf_counter", no_clock)
    timers = StepTimers(False, torch.device("cpu"))
    with timers.part("step"), timers.part("forward"):
        pass
    assert timers.wrap(lambda: 7, "optimizer")() == 7
    assert timers.pop() == {}
