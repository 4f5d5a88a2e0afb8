"""The one door through which MoE layers read device values on the host, and counts without one.

On an accelerator a host read waits for every queued kernel before Python goes on (a host synchronisation). An MoE
layer needs a few, all for sizes the host must know before it can launch the next kernel: the split sizes of an
uneven all-to-all, the row range of each expert in the per-expert GEMM loop, the number of copies a data-dependent
selection keeps. Each goes through `read_on_host` with its reason, so that they are few, named and testable:
tests/unit/test_device_agnostic.py runs every variant's layer on the `meta` device, where any other read fails.

Shapes: N items, E bins.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

READS: Counter = Counter()
"""Host reads through read_on_host in this process so far, by reason (the step profiler reports them per step)."""


def read_on_host(values: Tensor, why: str) -> int | float | list:
    """values as Python numbers (values.tolist()): a host synchronisation on an accelerator. `why` names the size
    the host needs (tests check every read has one of the known reasons)."""
    READS[why] += 1
    return values.tolist()


def count_per_bin(index_N: Tensor, num_bins: int) -> Tensor:
    """int64 [E]: how many entries of index_N equal each bin. torch.bincount without its host read (it sizes its
    output from the largest value, a synchronisation on a GPU): the size is known."""
    return torch.zeros(num_bins, dtype=torch.int64, device=index_N.device).index_add_(
        0, index_N, torch.ones_like(index_N))


def where_true(keep_N: Tensor, why: str) -> Tensor:
    """int64 indices of the True entries, in order (a boolean mask's selection): one host read for the count."""
    count = read_on_host(keep_N.sum(), why)
    return torch.nonzero_static(keep_N, size=count).squeeze(1)
