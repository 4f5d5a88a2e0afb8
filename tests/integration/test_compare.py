"""tools/compare_variants.py --quick: every variant trains and evaluates, and the report, JSON and plots are written
with the seeds, overrides and commit (the pipeline, not the science: that is the default run's job)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_quick_comparison_writes_the_report(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_variants.py"), "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    variants = {run["variant"] for run in results["runs"]}
    assert variants == set(results["meta"]["variants"]) and len(variants) == 11
    assert results["meta"]["commit"] != "unknown" and results["meta"]["seeds"] == [1]
    assert all(run["overrides"] is not None and run["valid_ppl"] > 1 for run in results["runs"])
    assert {c["claim"].split()[0] for c in results["claims"]} >= {"PEER", "Cartesian", "MPOE", "DA-MoE"}
    report = (tmp_path / "report.md").read_text()
    assert "| claim | holds | numbers |" in report and "K histogram" in report and "usage" in report
    for png in ("loss_curves.png", "final_ppl.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_variants.py"), "--from-results",
                           str(tmp_path / "results.json"), "--out", str(again)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (again / "report.md").read_text() == report, "the report rendered from results.json differs"
