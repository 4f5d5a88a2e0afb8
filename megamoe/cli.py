"""What the command-line entry points (launchers/pretrain.py, tools/*.py) do alike: their parser, the run config and
overrides they take, a user's mistake said in one line on stderr with an exit status instead of a traceback, and a
benchmark's table and --json records.

An entry point is a thin script around library calls (launchers/pretrain.py is the model to copy). Its first
statement, the same line in every one, lets it run from a checkout that is not installed; then it imports this:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

Only entry points import this module: it sits above every layer of the library, which raises its errors and never
prints them. It imports the standard library and megamoe.utils.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megamoe.utils import global_rank

OVERRIDE = "section.key=value"
"""How usage and --help show the positional config overrides."""


def parser(doc: str | None, *, local_rank: bool = False) -> argparse.ArgumentParser:
    """A parser whose --help prints `doc` (the entry point's module docstring) as written. local_rank: accept, and
    ignore, the --local_rank=N that the deepspeed launcher appends (the ranks come from the environment)."""
    new = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if local_rank:
        new.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return new


def add_config(parser: argparse.ArgumentParser, help: str, *, required: bool = True,
               overrides: str | None = None) -> None:
    """--config (a run's YAML: its deltas to megamoe's defaults) and the positional overrides applied to it:
    args.config and args.overrides, as config.load takes them."""
    parser.add_argument("--config", required=required, help=help)
    add_overrides(parser, overrides)


def add_overrides(parser: argparse.ArgumentParser, help: str | None = None, *, at_least_one: bool = False) -> None:
    """The positional `section.key=value ...` config overrides: args.overrides, a list."""
    parser.add_argument("overrides", nargs="+" if at_least_one else "*", metavar=OVERRIDE, help=help)


def fail(what: str, err: BaseException | str, code: int = 2, *, every_rank: bool = False) -> int:
    """Say `megamoe: <what>: <err>` in one line on stderr and return `code`, the entry point's exit status. Every
    rank of a launch finds the same mistake in the user's input, so only rank 0 says it, unless `every_rank` (a
    failure of each rank's own, which names the rank in `what`)."""
    if every_rank or global_rank() == 0:
        print(f"megamoe: {what}: {err}", file=sys.stderr)
    return code


def print_table(table: str, records: Iterable[Any], json_path: str | None = None) -> None:
    """A benchmark's results: its markdown `table` on stdout and, if --json named a file, its dataclass `records`
    there as a JSON list, one record a line."""
    print(table, flush=True)
    if json_path:
        Path(json_path).write_text("[\n" + ",\n".join(json.dumps(asdict(r)) for r in records) + "\n]\n")
