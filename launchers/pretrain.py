"""Train a megamoe model: deepspeed launchers/pretrain.py --config configs/<x>.yaml [section.key=value ...]

Runs the same code on GPU clusters (NCCL) and on CPU machines (gloo). Configuration mistakes are reported
in one line before any process group starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli, config
from megamoe.data.checks import DataFileError
from megamoe.train import startup
from megamoe.train.integrity import CheckpointError
from megamoe.utils import global_rank, gpu_host, reexec_with_glibc_reuse


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, local_rank=True)
    cli.add_config(parser, "YAML file holding the deltas to megamoe's defaults")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
        layout = startup.check(cfg)
    except config.ConfigError as err:
        return cli.fail("config error", err)
    except CheckpointError as err:
        return cli.fail("checkpoint error", err)
    from megamoe.train import loop  # heavy imports (megatron, deepspeed) only after the config is good
    from megamoe.train.preemption import Preempted

    try:
        loop.run(cfg, layout)
    except Preempted as stopped:  # a scheduler's signal: with a checkpoint written, the job script requeues
        return stopped.exit_code
    except (CheckpointError, DataFileError, loop.NonFiniteTraining) as err:
        return cli.fail(f"rank {global_rank()}", err, 1, every_rank=True)
    except KeyboardInterrupt:  # Ctrl-C during the set-up, or a second one while training
        return cli.fail(f"rank {global_rank()}", "interrupted; no checkpoint written", 130, every_rank=True)
    return 0


if __name__ == "__main__":
    if not gpu_host():  # tensors live in host memory: glibc keeps a step's freed buffers for the next (utils.py)
        reexec_with_glibc_reuse()
    sys.exit(main())
