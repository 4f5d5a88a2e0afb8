"""The hostile-input probe: careless or unlucky inputs through the command line only, each in its own directory.

    python -m tests.probe --out runs/probe [--repo <checkout>] [--cases a,b,...] [--list] [--table]

Every case runs a real command (the deepspeed launcher with 2 processes, or a tool) against its own copy of a
20-step tiny-MoE checkpoint (EP=2, ZeRO-2) and dataset, and records the exit code, the first line the user is
told (a megamoe one-line error, else the last line of a traceback, else the last line printed), whether it
hung, which processes it left running, and what it lost or left behind (a `check` per case). `--repo` runs
the same cases against another checkout (e.g. a `git worktree` of an older commit) for a before/after table.
Writes `<out>/results.json` and `<out>/table.md`. Not part of the test suite: a full probe takes ~40 minutes
on 2 cores. The regression tests of each fixed case live in tests/unit and tests/integration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.probe import cases_issue, cases_new  # noqa: F401  (they register the cases)
from tests.probe.harness import (
    CASES,
    HERE,
    build_fixtures,
    run_case,
    summarise,
    verdict,
)


def write_table(results: list[dict], out: Path) -> None:
    rows = ["| case | source | command (abridged) | rc | first line it prints | outcome | verdict |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        said = r["said"].replace("|", "\\|")
        command = r["command"][-160:].replace("|", "\\|")
        outcome = (r["outcome"] + (f"; {r['notes']}" if r["notes"] else "")).replace("|", "\\|")
        rc = "hung" if r["hung"] else r["rc"]
        rows.append(f"| {r['name']} | {r['source']} | `{command}` | {rc} | {said} | {outcome} | {r['verdict']} |")
    (out / "table.md").write_text("\n".join(rows) + "\n")


def rewrite_table(out: Path) -> int:
    """The table again from the stored results, each case's output summarised anew (its verdict too)."""
    cases = {c.name: c for c in CASES}
    results = json.loads((out / "results.json").read_text())
    for r in results:
        log = out / "cases" / r["name"].replace("/", "_") / "output.txt"
        if log.is_file() and r["name"] in cases:
            r["said"], r["traceback"] = summarise(log.read_text(errors="replace"))
            r["verdict"] = verdict(cases[r["name"]], r)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, out)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/probe"))
    parser.add_argument("--repo", type=Path, default=HERE, help="the checkout to probe (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="its environment's python")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from results.json and each "
                        "case's output.txt")
    args = parser.parse_args()
    if args.list:
        for item in CASES:
            print(f"{item.name:40s} {item.source:6s} {item.group:7s} {item.what}")
        return 0
    wanted = set(args.cases.split(",")) if args.cases else None
    if wanted and (unknown := wanted - {c.name for c in CASES}):
        parser.error(f"unknown cases {sorted(unknown)}")
    out, repo = args.out.resolve(), args.repo.resolve()
    if args.table:
        return rewrite_table(out)
    out.mkdir(parents=True, exist_ok=True)
    fixtures = build_fixtures(repo, args.python, out)
    results_file = out / "results.json"
    results = {r["name"]: r for r in json.loads(results_file.read_text())} if results_file.is_file() else {}
    for item in CASES:
        if wanted is not None and item.name not in wanted:
            continue
        result = run_case(item, repo, args.python, fixtures, out)
        results[item.name] = result
        print(f"{result['verdict']:9s} {item.name:40s} rc={result['rc']} {result['seconds']:6.1f}s  {result['said']}",
              flush=True)
        order = [c.name for c in CASES]
        results_file.write_text(json.dumps(sorted(results.values(), key=lambda r: order.index(r["name"])), indent=1))
    write_table(sorted(results.values(), key=lambda r: [c.name for c in CASES].index(r["name"])), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
