"""Checkpoint-and-requeue: a scheduler's warning signal (or a user's Ctrl-C) stops training at the next step
boundary.

Slurm sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@<seconds>`) and SIGTERM on preemption or
scancel; Ctrl-C sends SIGINT (a second one interrupts at once). Each sets a flag; after each optimizer step every
rank learns whether any rank got one (one tiny all-reduce: ranks must stop at the same step, and a signal may
reach only some of them), the run writes a checkpoint and raises Preempted, and the launcher exits with
REQUEUE_EXIT_CODE so that the job script requeues the job (launchers/slurm/pretrain.sbatch), which then resumes
from that checkpoint. A rank whose launching process has ended stops the same way (LauncherWatch).

The exit code alone is not enough under `srun --kill-on-bad-exit`: the first task to exit 75 makes srun kill
the others, and srun then reports their signal. So, before any rank exits, rank 0 also creates the file named
by $MEGAMOE_REQUEUE_MARKER (when set), which the job script checks.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.utils import get_logger

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
REQUEUE_MARKER_ENV = "MEGAMOE_REQUEUE_MARKER"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped on request)
    """Training stopped on a scheduler's signal, after writing a checkpoint when `saved`."""

    def __init__(self, step: int, signum: int, saved: bool) -> None:
        written = "checkpoint written" if saved else "no checkpoint written (checkpoint.save is not set)"
        super().__init__(f"stopped at step {step} on {signal.Signals(signum).name}: {written}")
        self.step, self.signum, self.saved = step, signum, saved

    @property
    def exit_code(self) -> int:
        """75 asks the job script to requeue (there is a checkpoint to resume); otherwise the signal's 128 + n."""
        return REQUEUE_EXIT_CODE if self.saved else 128 + self.signum


def announce_requeue() -> None:
    """Rank 0 creates $MEGAMOE_REQUEUE_MARKER (if set), then every rank waits for it. Collective."""
    marker = os.environ.get(REQUEUE_MARKER_ENV)
    if marker and (not dist.is_initialized() or dist.get_rank() == 0):
        Path(marker).touch()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class StopRequests:
    """Catches SIGUSR1, SIGTERM and SIGINT (Ctrl-C) while active (from the main thread; elsewhere signals cannot
    be caught); a second SIGINT interrupts at once (KeyboardInterrupt). The end of the process that launched this
    rank counts as a SIGTERM too (LauncherWatch)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}
        self.launcher = LauncherWatch()

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the checkpoint
        self.signum = self.signum or signum  # Ctrl-C also makes DeepSpeed's launcher send SIGTERM: keep the first

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none). Collective: every rank calls it after the same step."""
        if not self.signum and (gone := self.launcher.gone()):
            get_logger().warning(f"{gone}: stopping as on SIGTERM")
            self.signum = signal.SIGTERM
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


class LauncherWatch:
    """Whether the processes that launched this rank are still there. DeepSpeed's `deepspeed` command forwards no
    signal to the per-node launcher it starts (deepspeed.launcher.launch, which does forward SIGINT and SIGTERM to
    the ranks): a SIGTERM from a job scheduler, a SIGKILL, a closed terminal end it alone, and the launcher and
    the ranks would train on as orphans. So a rank watches its parent and, under DeepSpeed's launcher, the
    launcher's parent (read from /proc at each step boundary; Linux only)."""

    def __init__(self) -> None:
        self.parent = os.getppid()
        self.grandparent = _parent_of(self.parent) if _is_deepspeed_launcher(self.parent) else None

    def gone(self) -> str | None:
        """What ended, or None."""
        if os.getppid() != self.parent:
            return f"the process that launched this rank (pid {self.parent}) has ended"
        if self.grandparent is not None and _parent_of(self.parent) != self.grandparent:
            return f"the `deepspeed` command (pid {self.grandparent}) has ended"
        return None


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state": the command may hold spaces


def _is_deepspeed_launcher(pid: int) -> bool:
    try:
        return b"deepspeed.launcher.launch" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
