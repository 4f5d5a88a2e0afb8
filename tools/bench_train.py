"""Tokens/s, TFLOP/s and MFU of whole training steps: the dense model against MoE at equal active FFN compute
(top-2 and fine-grained at EP=1 and EP=2; at the demo size every other variant too), each run launched like
launchers/pretrain.py on 2 processes, and where each run's step time goes (megamoe/studies/bench_train.py).

  python tools/bench_train.py [--sizes demo small] [--runs NAME ...] [--steps 60] [--warmup 10]
                              [--out runs/bench-train] [--json f]
Prints three markdown tables: throughput (medians over the steps after the warm-up); rank 0's step time by part from
the step timers, with each MoE run's ceiling (its ratio to dense if its MoE layers were as fast as the dense MLP); and
rank 0's step time by part and region with its host syncs (its last steps under the PyTorch profiler); --json writes
one record per run.
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
    parser.add_argument("--runs", nargs="+", help="only the runs with these names (dense is always run)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the medians")
    parser.add_argument("--out", default="runs/bench-train", help="where the runs and the tokenized corpus go")
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps - bench_train.PROFILED_STEPS - 1:
        parser.error(f"--warmup {args.warmup} must leave at least two of the --steps {args.steps} measured (the last "
                     f"{bench_train.PROFILED_STEPS} are profiled, not measured)")
    out = Path(args.out)
    data = prepare_data(str(bench_train.ROOT / "data" / "shakespeare-train.jsonl.gz"), out / "data", 4000)
    try:
        results = [bench_train.measure(size, run, overrides, data, out, args.steps, args.warmup)
                   for size in args.sizes for run, overrides in bench_train.runs(size).items()
                   if run == "dense" or not args.runs or run in args.runs]
    except RuntimeError as err:
        return cli.fail("bench_train", err)
    results = bench_train.relative_to_dense(results)
    cli.print_table(bench_train.table(results) + "\n\nRank 0's unprofiled step time by part, ms (medians; "
                    "ceiling: the ratio to dense with MoE layers as fast as the dense MLP):\n\n"
                    + bench_train.timers_table(results) + "\n\nRank 0's step time by part, ms per step under the "
                    "profiler (docs/benchmarks.md):\n\n" + bench_train.breakdown_table(results), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
