"""Logging helpers shared by every layer (L0)."""

from __future__ import annotations

import functools
import logging
import os
import sys

_FORMAT = "[%(asctime)s] [megamoe] %(message)s"


def get_logger(name: str = "megamoe") -> logging.Logger:
    """A logger that writes to stderr once per process; rank > 0 logs warnings only."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO if global_rank() == 0 else logging.WARNING)
    return logger


def global_rank() -> int:
    """This process's rank as set by the launcher (deepspeed, torchrun, srun via rankenv, mpirun)."""
    return int(os.environ.get("RANK", "0"))


def print_rank0(message: str) -> None:
    """Print on global rank 0 only (flushed: launchers interleave ranks' stdout)."""
    if global_rank() == 0:
        print(message, flush=True)


@functools.cache
def warn_once(message: str) -> None:
    """A setting was ignored or a fallback taken: say it once per process."""
    get_logger().warning(message)
