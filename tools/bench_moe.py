"""Time forward+backward of one MoE layer: megamoe (expert loop, grouped GEMM), megatron-core's MoELayer,
DeepSpeed's MoE, against the expert-GEMM floor, and count all-to-all bytes.

  python tools/bench_moe.py [--configs coarse fine] [--iters 5] [--warmup 2] [--json out.json]
  torchrun --nproc_per_node 2 tools/bench_moe.py --ep 2 --configs coarse
Prints a markdown table on rank 0; --json writes a JSON list, one record per (configuration, implementation).
Each process first re-runs itself with glibc's allocator set to keep freed memory (megamoe/studies/bench.py says why).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch

from megamoe import cli
from megamoe.parallel.launch import world_of_one
from megamoe.studies import bench
from megamoe.train import startup
from megamoe.utils import global_rank, reexec_with_glibc_reuse


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, local_rank=True)
    parser.add_argument("--configs", nargs="+", default=list(bench.SHAPES), choices=sorted(bench.SHAPES))
    parser.add_argument("--impls", nargs="+", default=list(bench.IMPLS), choices=bench.IMPLS)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size = number of ranks launched")
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    world_of_one()  # plain `python tools/bench_moe.py`, no launcher: a world of one
    startup.set_runtime_environment(torch.cuda.is_available())  # DeepSpeed's accelerator and JIT-op cache
    try:
        records = bench.run(args.configs, args.impls, ep_size=args.ep,
                            timing=bench.Timing(warmup=args.warmup, iters=args.iters))
    except ValueError as err:
        return cli.fail("bench_moe", err)
    if global_rank() == 0:
        cli.print_table(bench.format_table(records), records, args.json)
    return 0


if __name__ == "__main__":
    reexec_with_glibc_reuse()
    sys.exit(main())
