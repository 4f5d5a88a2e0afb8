"""Tokens/s, TFLOP/s and MFU of whole training steps: the dense model against top-2 MoE at equal active FFN
compute, at EP=1 and EP=2, each run launched like launchers/pretrain.py on 2 processes (megamoe/studies/bench_train.py).

  python tools/bench_train.py [--sizes demo small] [--steps 60] [--warmup 10] [--out runs/bench-train] [--json f]
Prints a markdown table (medians over the steps after the warm-up); --json writes one record per run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli
from megamoe.studies import bench_train
from megamoe.studies.compare import prepare_data


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--sizes", nargs="+", default=list(bench_train.SIZES), choices=list(bench_train.SIZES))
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the medians")
    parser.add_argument("--out", default="runs/bench-train", help="where the runs and the tokenized corpus go")
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps - 1:
        parser.error(f"--warmup {args.warmup} must leave at least two of the --steps {args.steps} measured")
    out = Path(args.out)
    data = prepare_data(str(bench_train.ROOT / "data" / "shakespeare-train.jsonl.gz"), out / "data", 4000)
    try:
        results = [bench_train.measure(size, run, overrides, data, out, args.steps, args.warmup)
                   for size in args.sizes
                   for run, overrides in bench_train.runs(bench_train.SIZES[size]["ffn"]).items()]
    except RuntimeError as err:
        return cli.fail("bench_train", err)
    results = bench_train.relative_to_dense(results)
    cli.print_table(bench_train.table(results), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
