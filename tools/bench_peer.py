"""Time forward+backward and measure peak memory of one PEER layer as the number of experts N grows: megamoe's
PEERMoE against lucidrains' PEER-pytorch (pip install megamoe[bench]) at the same configuration.

  python tools/bench_peer.py [--sides 128 256 512 1024] [--tokens 4096] [--dim 256] [--iters 3] [--warmup 1]
                             [--impls megamoe peer-pytorch] [--json out.json]
Each (N, implementation) runs in its own fresh process, one at a time, with every core. Prints a markdown table;
--json writes a JSON list, one record per (N, implementation), ratios included.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch

from megamoe import cli
from megamoe.studies import bench_peer
from megamoe.train import startup


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--sides", nargs="+", type=int, default=[128, 256, 512, 1024],
                        help="sqrt(N) of each expert count to time (N = side^2)")
    parser.add_argument("--impls", nargs="+", default=list(bench_peer.IMPLS), choices=bench_peer.IMPLS)
    parser.add_argument("--tokens", type=int, default=4096, help="T: tokens of one forward")
    parser.add_argument("--dim", type=int, default=256, help="d: hidden size")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--topk", type=int, default=16, help="k: experts per head")
    parser.add_argument("--key-dim", type=int, default=128, help="d_k: query width per head")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="megamoe's tokens per expert chunk")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--threads", type=int, help="torch threads per case (default: every core)")
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    # Before any allocation: huge pages for large CPU tensors (the cases inherit the environment).
    startup.set_runtime_environment(torch.cuda.is_available())
    cfg = bench_peer.PEERBenchConfig(
        num_tokens=args.tokens, hidden_size=args.dim, num_heads=args.heads, topk_per_head=args.topk,
        key_dim=args.key_dim, chunk_tokens=args.chunk_tokens, warmup=args.warmup, iters=args.iters,
        threads=args.threads)
    try:
        records = bench_peer.run(args.sides, args.impls, cfg)
    except ValueError as err:
        return cli.fail("bench_peer", err)
    cli.print_table(bench_peer.format_table(records), records, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
