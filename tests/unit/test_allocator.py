"""On a host without GPUs the training entry point re-runs itself with glibc keeping freed memory
(megamoe.utils.GLIBC_REUSE): a buffer freed and allocated again, as every training step does with DeepSpeed's
flattened gradients, stops costing page faults once the heap holds it. Checked by counting faults, not by timing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, resource, torch
from megamoe.utils import reexec_with_glibc_reuse
reexec_with_glibc_reuse()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.ones(16 << 20)  # 64 MB: glibc's default would mmap it and munmap it on free
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del buffer
print(os.environ.get("MALLOC_MMAP_THRESHOLD_"), *faults)
"""
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def run_probe(**env: str) -> tuple[str, list[int]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0], [int(f) for f in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_reexec_keeps_freed_memory_and_a_callers_setting_wins():
    setting, faults = run_probe()
    assert setting == str(4 << 30)
    # Reused, not faulted in again. Not every time: a 64-byte-aligned request can miss the exactly-sized freed block
    # and take fresh pages from the top of the heap (which it then keeps), so count the reallocations that reuse.
    assert faults[0] > PAGES // 2 and sum(f < PAGES // 20 for f in faults[1:]) >= 5, faults
    setting, faults = run_probe(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")  # glibc's own
    assert setting == "131072" and min(faults) > PAGES // 2, faults
