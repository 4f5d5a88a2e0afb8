"""Evaluate a checkpoint on the validation split: perplexity and MoE validation metrics.

  deepspeed --num_gpus 2 tools/evaluate.py --config configs/x.yaml checkpoint.load=runs/x/checkpoints \\
      [moe.drop_top_ranks=1]
Evaluation-only options (moe.drop_top_ranks: route each token past its best expert) apply here; the parallel
layout may differ from training's expert-parallel size (weights are resharded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli, config
from megamoe.data.checks import DataFileError
from megamoe.train import startup
from megamoe.train.integrity import CheckpointError
from megamoe.utils import print_rank0


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, local_rank=True)
    cli.add_config(parser, "the training YAML (plus overrides)")
    args = parser.parse_args(argv)
    try:
        # Evaluation writes nothing: no checkpoints (the training config's directory is not this run's to check).
        cfg = config.load(args.config, [*args.overrides, "logging.wandb=false", "logging.tensorboard=false",
                                        "checkpoint.save=null"])
        if cfg.checkpoint.load is None:
            raise config.ConfigError("checkpoint.load is not set; pass checkpoint.load=<a run's checkpoint directory>")
        layout = startup.check(cfg)
    except (config.ConfigError, CheckpointError) as err:
        return cli.fail("evaluate", err)
    from megamoe.train.loop import evaluate_checkpoint

    try:
        metrics = evaluate_checkpoint(cfg, layout)
    except (CheckpointError, DataFileError, ValueError) as err:
        return cli.fail("evaluate", err)
    print_rank0(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
