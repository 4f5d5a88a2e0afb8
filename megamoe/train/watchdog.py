"""A rank that stalls or crashes says where, and a stalled rank ends itself instead of holding the job.

Not every wait has a timeout: a collective on a process group created without one (DeepSpeed's expert groups
get torch's default of 30 minutes, NCCL's watchdog may be off), a DataLoader worker that never answers, a hung
file system. The other ranks then wait on the stalled one and the job holds its nodes until the scheduler's
limit, saying nothing. While training, faulthandler's watchdog (a C thread: it needs no GIL and fires whatever
Python is blocked in) is re-armed after every step: when none finishes within parallel.step_timeout_minutes,
the rank prints `Timeout (h:mm:ss)!` and every thread's Python stack to stderr and exits 1, and the launcher
ends the other ranks. Leaving the watchdog re-arms it: the rank has as long again to exit, so a teardown that
hangs (a process group or data worker that does not let go) is caught too. A fatal signal (segfault, bus error,
abort) prints the stacks as well.
"""

from __future__ import annotations

import faulthandler
import sys


class StallWatchdog:
    """Armed from entry to process exit; `progress()` after each step restarts the clock. `minutes=None`: crash
    stacks only."""

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None else minutes * 60.0

    def __enter__(self) -> StallWatchdog:
        faulthandler.enable(file=sys.stderr, all_threads=True)
        self.progress()
        return self

    def __exit__(self, *exc) -> None:
        self.progress()  # the exit, too, must not hang

    def progress(self) -> None:
        """The rank is not stalled: it has until `minutes` from now to call this again."""
        if self.seconds is not None:
            faulthandler.dump_traceback_later(self.seconds, exit=True, file=sys.stderr)
