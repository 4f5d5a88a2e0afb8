"""Wall time of the parts of every training step, without the profiler (logging.step_timers).

The profiler's own cost lands unevenly on the parts it records (DeepSpeed's copies into and out of its flat
gradient buffer, for one), so its breakdown suits comparing parts of a profiled step, not the unprofiled step's
shares. These timers read the clock at each part's boundaries, the device synchronised there: the time a part takes
is the work it queued, not the time to queue it (on an accelerator a host clock alone measures launches). That is
a few synchronisations per step, so they are off unless asked for; on a CPU the synchronisation costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator

import torch

PARTS = ("step", "data", "forward", "backward", "grad_reduction", "optimizer")
"""'grad_reduction' is DeepSpeed's allreduce_gradients, called inside the backward at the accumulation boundary
(all of ZeRO-0/1's reduction; ZeRO-2 also reduces buckets while the backward runs, which stays in 'backward')."""
REPORTED = (*PARTS[1:], "other")
"""The parts `pop` reports: the step split into the others and 'other', the rest of it."""


class StepTimers:
    """Sums the wall time of each part since the last `pop`; disabled, each call only checks a flag."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled, self.device = enabled, device
        self._seconds = dict.fromkeys(PARTS, 0.0)
        self._steps = 0

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self._seconds[name] += time.perf_counter() - start
            self._steps += name == "step"

    def wrap(self, fn: Callable, name: str) -> Callable:
        """`fn` timed as part `name` at every call."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)

        return timed

    def wrap_as(self, name: str) -> Callable[[Callable], Callable]:
        """A decorator: `wrap(fn, name)`."""
        return functools.partial(self.wrap, name=name)

    def pop(self) -> dict[str, float]:
        """time/<part>_ms per step since the last call: 'backward' without the gradient reduction inside it, and
        'other' the step's time outside its parts (loss bookkeeping, MoE step hooks, ...). {} if disabled."""
        if not self.enabled or not self._steps:
            return {}
        ms = {name: 1e3 * seconds / self._steps for name, seconds in self._seconds.items()}
        ms["backward"] -= ms["grad_reduction"]
        step_ms = ms.pop("step")
        ms["other"] = step_ms - sum(ms.values())
        self._seconds, self._steps = dict.fromkeys(PARTS, 0.0), 0
        return {f"time/{name}_ms": value for name, value in ms.items()}

    def _synchronize(self) -> None:
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)
