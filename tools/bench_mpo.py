"""Time MPOE experts' forward+backward two ways: rebuild the matrices then GEMMs (megamoe's way, once per
optimizer step) vs contracting the tokens through the MPO chain (mpo.apply_chain), against the GEMM floor.

  python tools/bench_mpo.py [--shapes tiny t5-base-D16] [--methods rebuild chain gemm-floor] [--iters 3]
                            [--warmup 1] [--json out.json]
Shapes: tiny (the demo model's experts, exact MPO), t5-base (the paper's T5-base factorisation, exact: the
chain is very slow there, time it with --methods rebuild gemm-floor), t5-base-D16 (bonds truncated to 16).
Prints a markdown table, then which method is faster per shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli
from megamoe.studies import bench_mpo
from megamoe.studies.bench import Timing


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "t5-base-D16"], help=", ".join(bench_mpo.SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(bench_mpo.METHODS), help=", ".join(bench_mpo.METHODS))
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--json", help="also write the records as JSON here")
    args = parser.parse_args(argv)
    try:
        bench_mpo.validate(args.shapes, args.methods)
    except ValueError as err:
        parser.error(str(err))
    records = bench_mpo.run(args.shapes, args.methods, Timing(warmup=args.warmup, iters=args.iters))
    print(bench_mpo.format_table(records))
    print("\n".join(bench_mpo.verdict(records)))
    if args.json:
        Path(args.json).write_text(json.dumps(bench_mpo.as_dicts(records), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
