"""Predict per-GPU memory and all-to-all traffic of a run before launching it.

  python tools/plan.py --config configs/mixtral-1b-ep8.yaml --nodes 2 --gpus-per-node 8 [section.key=value ...]
Prints, per pipeline stage (one rank of it): weights, gradients and optimizer states under the ZeRO stage,
activations kept for backward (times the micro-batches the 1F1B schedule keeps alive) and the bytes the rank
sends to other ranks through the expert-parallel all-to-all per optimizer step (megamoe/moe/plan.py says how;
tests/distributed/test_plan.py checks it against measured runs); then the bytes of one checkpoint (in all, from
the rank writing the most, per kind of file) and its save time at --fs-gbps of file-system bandwidth. The
vocabulary comes from --vocab-size, model.vocab_size or the config's tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli, config


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    cli.add_config(parser, "the run's YAML")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: model.vocab_size or the "
                        "config's data.tokenizer_model)")
    parser.add_argument("--fs-gbps", type=float, default=10.0,
                        help="aggregate write bandwidth of the checkpoint file system, GB/s (default %(default)s)")
    args = parser.parse_args(argv)
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            parser.error(f"{flag} {value} must be >= 1")
    if args.fs_gbps <= 0:
        parser.error(f"--fs-gbps {args.fs_gbps} must be > 0")
    from megamoe.data.tokenizer import vocab_size as tokenizer_vocab_size
    from megamoe.moe import plan

    world = args.nodes * args.gpus_per_node
    try:
        cfg = config.load(args.config, args.overrides)
        vocab = (args.vocab_size or cfg.model.vocab_size
                 or tokenizer_vocab_size(cfg.data.tokenizer_model, cfg.data.tokenizer_type))
        if vocab is None:
            raise config.ConfigError(f"the tokenizer {cfg.data.tokenizer_model} is missing: pass --vocab-size")
        config.validate(cfg, config.Environment(world_size=world, cuda_available=True, tokenizer_vocab_size=vocab,
                                                check_files=False))
    except (config.ConfigError, ValueError) as err:  # ValueError: a tokenizer file that is not a model
        return cli.fail("plan", err)
    print(plan.format_plan(plan.plan(cfg, world, vocab), cfg, world))
    print("\n" + plan.format_checkpoint(plan.checkpoint_plan(cfg, world, vocab), args.fs_gbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
