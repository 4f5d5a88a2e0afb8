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

A rank that ends, however abruptly (this watchdog's exit, SIGKILL, the OOM killer), takes the processes it forked
with it (Linux): a DataLoader worker otherwise lives on, and one that is itself stuck (fork() from a rank with
dozens of communication threads is not safe) never notices, keeps the job's output pipes open and holds the
launch (and a test's wait on it) long after every rank has gone.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_forking = (0, False)  # (pid, on its main thread) of the process that is forking, as its child sees it
_children_die_with_parent = False


class StallWatchdog:
    """Armed from entry to process exit; `progress()` after each step restarts the clock. `minutes=None`: crash
    stacks only."""

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None else minutes * 60.0

    def __enter__(self) -> StallWatchdog:
        faulthandler.enable(file=sys.stderr, all_threads=True)
        children_die_with_this_process()
        self.progress()
        return self

    def __exit__(self, *exc) -> None:
        self.progress()  # the exit, too, must not hang

    def progress(self) -> None:
        """The rank is not stalled: it has until `minutes` from now to call this again."""
        if self.seconds is not None:
            faulthandler.dump_traceback_later(self.seconds, exit=True, file=sys.stderr)


def children_die_with_this_process() -> None:
    """From now on every child this process forks from its main thread gets SIGKILL when this process ends (Linux;
    elsewhere nothing). Once per process: fork handlers cannot be removed."""
    global _children_die_with_parent
    if _children_die_with_parent or not sys.platform.startswith("linux"):
        return
    _children_die_with_parent = True
    os.register_at_fork(before=_note_forking_thread, after_in_child=_die_with_parent)


def _note_forking_thread() -> None:
    global _forking
    _forking = (os.getpid(), threading.current_thread() is threading.main_thread())


def _die_with_parent() -> None:
    parent, on_main_thread = _forking
    # The kernel sends the signal when the forking *thread* ends: only children of the main thread are tied.
    if not on_main_thread:
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
