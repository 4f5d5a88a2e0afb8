"""Time forward+backward of one MoE layer: megamoe (expert loop, grouped GEMM), megatron-core's MoELayer,
DeepSpeed's MoE, against the expert-GEMM floor, and count all-to-all bytes.

  python tools/bench_moe.py [--configs coarse fine] [--iters 5] [--warmup 2] [--json out.json]
  torchrun --nproc_per_node 2 tools/bench_moe.py --ep 2 --configs coarse
Prints a markdown table on rank 0; --json writes a JSON list, one record per (configuration, implementation).
Each process first re-runs itself with glibc's allocator set to keep freed memory (megamoe/train/bench.py says why).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from megamoe.train import bench, startup  # noqa: E402
from megamoe.utils import environment_with_glibc_reuse, global_rank  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(bench.SHAPES), choices=sorted(bench.SHAPES))
    parser.add_argument("--impls", nargs="+", default=list(bench.IMPLS), choices=bench.IMPLS)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size = number of ranks launched")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed adds it; env has it
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:  # plain `python tools/bench_moe.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    startup.set_runtime_environment(torch.cuda.is_available())  # DeepSpeed's accelerator and JIT-op cache
    try:
        records = bench.run(args.configs, args.impls, ep_size=args.ep,
                            timing=bench.Timing(warmup=args.warmup, iters=args.iters))
    except ValueError as err:
        if global_rank() == 0:
            print(f"bench_moe: {err}", file=sys.stderr)
        return 2
    if global_rank() == 0:
        print(bench.format_table(records), flush=True)
        if args.json:
            Path(args.json).write_text("[\n" + ",\n".join(json.dumps(asdict(r)) for r in records) + "\n]\n")
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    if (env := environment_with_glibc_reuse()) is not None:  # glibc reads it at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    sys.exit(main())
