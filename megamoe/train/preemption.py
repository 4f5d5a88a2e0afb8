"""Checkpoint-and-requeue: a scheduler's warning signal stops training at the next step boundary.

Slurm sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@<seconds>`) and SIGTERM on preemption or
scancel. Either sets a flag; after each optimizer step every rank learns whether any rank got one (one tiny
all-reduce: ranks must stop at the same step, and a signal may reach only some of them), the run writes a
checkpoint and raises Preempted, and the launcher exits with REQUEUE_EXIT_CODE so that the job script
requeues the job (launchers/slurm/pretrain.sbatch), which then resumes from that checkpoint.

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

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
REQUEUE_MARKER_ENV = "MEGAMOE_REQUEUE_MARKER"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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
    """Catches SIGUSR1 and SIGTERM (from the main thread; elsewhere signals cannot be caught) while active."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none). Collective: every rank calls it after the same step."""
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
