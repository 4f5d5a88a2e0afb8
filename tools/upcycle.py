"""Upcycle a dense megamoe checkpoint into a top-k MoE or an MPOE checkpoint, ready to fine-tune.

  python tools/upcycle.py --load runs/tiny-dense/checkpoints --save runs/upcycled-mpoe \\
      moe.variant=mpo moe.num_experts=8 [section.key=value ...]
  deepspeed --num_gpus 2 launchers/pretrain.py --config runs/upcycled-mpoe/finetune.yaml [train.train_iters=...]
Top-k experts are copies of the dense FFN; MPOE experts share its exact decomposition (the central tensor frozen:
p_mask=1, no balancing loss, unless overridden). Routers start fresh. The overrides apply to the dense run's
config; the model section must stay the same. Writes a weights-only checkpoint (iteration 0) and finetune.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli, config


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--load", required=True, help="the dense run's checkpoint directory (its 'latest' tag)")
    parser.add_argument("--save", required=True, help="directory of the upcycled checkpoint and finetune.yaml")
    cli.add_overrides(parser, "the MoE layers, e.g. moe.variant=mpo moe.num_experts=8", at_least_one=True)
    args = parser.parse_args(argv)
    from megamoe.convert.upcycle import upcycle
    from megamoe.train.integrity import CheckpointError

    try:
        upcycle(args.load, args.save, args.overrides)
    except (config.ConfigError, ValueError, FileNotFoundError, CheckpointError) as err:
        return cli.fail("upcycle", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
