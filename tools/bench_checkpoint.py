"""Training stall per checkpoint save, synchronous against background (checkpoint.async_save), side by side in one
invocation (megamoe/studies/bench_checkpoint.py: two runs launched on 2 processes, an 82 M-parameter model).

  python tools/bench_checkpoint.py [--steps 13] [--out runs/bench-checkpoint] [--json f]
Prints a markdown table: the seconds training waited per save in each mode, and their ratio.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli
from megamoe.studies import bench_checkpoint
from megamoe.studies.bench_train import ROOT
from megamoe.studies.compare import prepare_data


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--steps", type=int, default=13, help="training steps per run (saves every "
                        f"{bench_checkpoint.SAVE_INTERVAL}; the last step's save is not measured)")
    parser.add_argument("--out", default="runs/bench-checkpoint", help="where the runs, checkpoints and corpus go")
    parser.add_argument("--json", help="write the two records to this file")
    args = parser.parse_args(argv)
    if args.steps <= bench_checkpoint.SAVE_INTERVAL:
        parser.error(f"--steps must exceed {bench_checkpoint.SAVE_INTERVAL}: no save would be measured")
    out = Path(args.out)
    data = prepare_data(str(ROOT / "data" / "shakespeare-train.jsonl.gz"), out / "data", 4000)
    results = []
    try:
        for mode in ("sync", "async"):
            shutil.rmtree(out / mode, ignore_errors=True)
            results.append(bench_checkpoint.measure(mode, data, out, args.steps))
    except RuntimeError as err:
        return cli.fail("bench_checkpoint", err)
    sync, background = results
    print(f"{sync.parameters:,} parameters per rank; checkpoint {sync.checkpoint_bytes / 2**20:,.0f} MiB; a save "
          f"every {bench_checkpoint.SAVE_INTERVAL} steps\n")
    cli.print_table(bench_checkpoint.table(sync, background), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
