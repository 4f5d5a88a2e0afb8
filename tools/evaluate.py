"""Evaluate a checkpoint on the validation split: perplexity and MoE validation metrics.

  deepspeed --num_gpus 2 tools/evaluate.py --config configs/x.yaml checkpoint.load=runs/x/checkpoints \\
      [moe.drop_top_ranks=1]
Evaluation-only options (moe.drop_top_ranks: route each token past its best expert) apply here; the parallel
layout may differ from training's expert-parallel size (weights are resharded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megamoe import config  # noqa: E402
from megamoe.data.checks import DataFileError  # noqa: E402
from megamoe.train import startup  # noqa: E402
from megamoe.train.integrity import CheckpointError  # noqa: E402
from megamoe.utils import global_rank  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the training YAML (plus overrides)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed adds it; env has it
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        # Evaluation writes nothing: no checkpoints (the training config's directory is not this run's to check).
        cfg = config.load(args.config, [*args.overrides, "logging.wandb=false", "logging.tensorboard=false",
                                        "checkpoint.save=null"])
        if cfg.checkpoint.load is None:
            raise config.ConfigError("checkpoint.load is not set; pass checkpoint.load=<a run's checkpoint directory>")
        layout = startup.check(cfg)
    except (config.ConfigError, CheckpointError) as err:
        if global_rank() == 0:
            print(f"megamoe: evaluate: {err}", file=sys.stderr)
        return 2
    from megamoe.train.loop import evaluate_checkpoint

    try:
        metrics = evaluate_checkpoint(cfg, layout)
    except (CheckpointError, DataFileError, ValueError) as err:
        if global_rank() == 0:
            print(f"megamoe: evaluate: {err}", file=sys.stderr)
        return 2
    if global_rank() == 0:
        print(json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
