"""Named regions of a training step for the PyTorch profiler (megamoe/train/profile.py sums time by region).

A region costs a few microseconds when no profiler runs: mark parts of a step, not every operator.
"""

from __future__ import annotations

from torch.profiler import record_function

PREFIX = "megamoe/"


def region(part: str) -> record_function:
    """A profiler region for one part of a step: a context manager or a function decorator."""
    return record_function(PREFIX + part)
