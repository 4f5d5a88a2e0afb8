"""Convert a megamoe checkpoint (any TP/EP layout) to a Hugging Face directory.

  python tools/convert_checkpoint.py --load runs/tiny-dense/checkpoints --save hf/tiny-dense [--dtype bfloat16]
Dense models become LlamaForCausalLM, top-k MoE models MixtralForCausalLM (config.json, model.safetensors,
generation_config.json, tokenizer.model + tokenizer_config.json). Shards are merged from the checkpoint files
alone, in one process. Settings the native classes cannot express are refused with the reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megamoe import config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="a run's checkpoint directory (its 'latest' tag is read)")
    parser.add_argument("--save", required=True, help="the HF directory to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the saved weights")
    args = parser.parse_args(argv)
    from megamoe.hf.llama import UnsupportedExport
    from megamoe.train.export import export_hf

    try:
        export_hf(args.load, args.save, args.dtype)
    except (UnsupportedExport, config.ConfigError, FileNotFoundError, ValueError) as err:
        print(f"megamoe: convert_checkpoint: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
