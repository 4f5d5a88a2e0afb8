"""Train a megamoe model: deepspeed launchers/pretrain.py --config configs/<x>.yaml [section.key=value ...]

Runs the same code on GPU clusters (NCCL) and on CPU machines (gloo). Configuration mistakes are reported
in one line before any process group starts.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--config", required=True, help="YAML file holding the deltas to megamoe's defaults")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed adds it; env has it
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
        layout = startup.check(cfg)
    except (config.ConfigError, CheckpointError) as err:
        if global_rank() == 0:  # every rank finds the same mistake: say it once
            kind = "config" if isinstance(err, config.ConfigError) else "checkpoint"
            print(f"megamoe: {kind} error: {err}", file=sys.stderr)
        return 2
    from megamoe.train import loop  # heavy imports (megatron, deepspeed) only after the config is good
    from megamoe.train.preemption import Preempted

    try:
        loop.run(cfg, layout)
    except Preempted as stopped:  # a scheduler's signal: with a checkpoint written, the job script requeues
        return stopped.exit_code
    except (CheckpointError, DataFileError, loop.NonFiniteTraining) as err:
        print(f"megamoe: rank {global_rank()}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C during the set-up, or a second one while training
        print(f"megamoe: rank {global_rank()}: interrupted; no checkpoint written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
