"""Print the three equal-size configurations of the CartesianMoE comparison (arXiv:2410.16077) for a budget.

  python tools/cartesian_sizes.py --hidden-size 128 --ffn-hidden-size 352 --num-experts 8
Prints the moe.* overrides of (a) top-2, (b) fine-grained + shared, (c) Cartesian, and their parameter counts
(asserted equal: routed total and active in all three, shared in (b) and (c)).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli
from megamoe.variants.cartesian.sizing import comparison_configs, equal_size_comparison, overrides


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--hidden-size", type=int, required=True, help="model width d")
    parser.add_argument("--ffn-hidden-size", type=int, required=True, help="dense FFN width d_ff (even)")
    parser.add_argument("--num-experts", type=int, required=True, help="N: experts of (a)")
    args = parser.parse_args(argv)
    try:
        sizes = equal_size_comparison(args.hidden_size, args.ffn_hidden_size, args.num_experts)
    except ValueError as err:
        parser.error(str(err))
    configs = comparison_configs(args.ffn_hidden_size, args.num_experts)
    print("| config | routed total | routed active | shared | routers, gates, norms | overrides |")
    print("|---|---|---|---|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size.routed_total:,} | {size.routed_active:,} | {size.shared:,} | {size.other:,} | "
              f"`{' '.join(overrides(configs[name]))}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
