"""Checkpoint-and-requeue: a scheduler's warning signal stops training at the next step boundary.

Slurm sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@<seconds>`) and SIGTERM on preemption or
scancel. Either sets a flag; after each optimizer step every rank learns whether any rank got one (one tiny
all-reduce: ranks must stop at the same step, and a signal may reach only some of them), the run writes a
checkpoint and raises Preempted, and the launcher exits with REQUEUE_EXIT_CODE so that the job script
requeues the job (launchers/slurm/pretrain.sbatch), which then resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped on request)
    """Training stopped on a scheduler's signal after writing a checkpoint (if checkpoint.save is set)."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped at step {step} on {signal.Signals(signum).name}")
        self.step, self.signum = step, signum


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
