"""Each platform patch is needed: megatron fails without it (the documented error) and works with it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megamoe import platform
from tests.helpers import ROOT, spawn
from tests.unit.platform_probe import SETUPS


def test_every_patch_has_a_probe():
    assert set(SETUPS) | {"split_sizes_as_numpy"} == set(platform.PATCHES)


@pytest.mark.parametrize("patch", sorted(SETUPS))
def test_patch_is_needed_and_sufficient(patch):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "unit" / "platform_probe.py"), patch],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert SETUPS[patch][1] in lines["WITHOUT"], lines
    assert lines["WITH"] == "ok", lines


def _split_sizes_probe() -> tuple[str, str]:
    from tests.unit.platform_probe import moe_layer, without_then_with

    return without_then_with("split_sizes_as_numpy", lambda: moe_layer(ep=2))


def test_split_sizes_patch_is_needed_with_expert_parallelism():
    """The alltoall dispatcher at EP=2 hands tensors as split sizes to gloo without the patch."""
    for without, with_patch in spawn(_split_sizes_probe, 2, timeout=180):
        assert "all_to_all_single(): incompatible function arguments" in without
        assert with_patch == "ok"


def test_nothing_is_patched_when_cuda_is_available(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(platform, "PATCHES", {name: lambda n=name: calls.append(n) for name in platform.PATCHES})
    monkeypatch.setattr(platform, "_applied", set())
    assert platform.apply() == [] and calls == []


def test_apply_is_idempotent_and_rejects_unknown_names(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(platform, "PATCHES", {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")})
    monkeypatch.setattr(platform, "_applied", set())
    assert platform.apply(skip={"b"}) == ["a"]
    assert platform.apply() == ["a", "b"] and platform.apply() == ["a", "b"]
    assert calls == ["a", "b"]
    with pytest.raises(ValueError, match="unknown platform patches"):
        platform.apply(skip={"c"})
