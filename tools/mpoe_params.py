"""MoE-layer parameters of MPOE vs a Switch layer (top-1, same router) with the same number of experts.

  python tools/mpoe_params.py --config configs/tiny-dense.yaml --num-experts 8,16 [section.key=value ...]
  python tools/mpoe_params.py --config configs/tiny-dense.yaml --num-experts 8,16 model.hidden_size=768 \\
      model.ffn_hidden_size=3072 model.swiglu=false \\
      'moe.mpo_shapes={fc1: [[4,4,8,6,4],[3,4,4,4,4]], fc2: [[3,4,4,4,4],[4,4,8,6,4]]}'   # T5-base (the paper's)
The model and moe.mpo_* settings come from the config (moe.variant=mpo is implied); one MPOE layer is built
(its decomposition done for real) and counted per expert count. Ratios are given with and without the router.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli, config


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    cli.add_config(parser, "a run config giving the model sizes (and moe.mpo_*)", overrides="config overrides")
    parser.add_argument("--num-experts", type=lambda s: [int(e) for e in s.split(",")], default=[8, 16],
                        help="comma-separated expert counts to report (default 8,16)")
    args = parser.parse_args(argv)
    from megamoe.variants.mpo.sizing import mpoe_parameter_report

    try:
        configs = {e: config.load(args.config, ["moe.variant=mpo", f"moe.num_experts={e}", *args.overrides])
                   for e in args.num_experts}
    except config.ConfigError as err:
        return cli.fail("mpoe_params", err)
    print("| experts | central | auxiliary (all experts) | router | MPOE layer | Switch layer | ratio | "
          "ratio without routers |")
    print("|---|---|---|---|---|---|---|---|")
    for experts, cfg in configs.items():
        model = cfg.model
        sizes = {"hidden_size": model.hidden_size, "swiglu": model.swiglu,
                 "ffn_hidden_size": cfg.moe.ffn_hidden_size or model.ffn_hidden_size or 4 * model.hidden_size}
        report = mpoe_parameter_report(cfg.moe, **sizes)
        bare = mpoe_parameter_report(cfg.moe, **sizes, count_router=False)
        print(f"| {experts} | {report.central:,} | {report.auxiliary:,} | {report.router:,} | {report.mpoe:,} | "
              f"{report.switch:,} | {report.ratio:.2f}x | {bare.ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
