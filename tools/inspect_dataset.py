"""Describe a Megatron indexed dataset: documents, tokens, document lengths and one decoded document.

  python tools/inspect_dataset.py data/processed/shakespeare_text_document \\
      [--tokenizer-model data/processed/shakespeare.model | <tokenizer.json>] [--sample 0] [--sample-tokens 64] [--json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("prefix", help="the dataset prefix (without .bin/.idx)")
    parser.add_argument("--tokenizer-model", help="a sentencepiece .model, or a tokenizer.json (or its "
                        "directory), to decode the sample with")
    parser.add_argument("--sample", type=int, default=0, help="the document to show")
    parser.add_argument("--sample-tokens", type=int, default=64, help="how many of its tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for path in (args.prefix + ".bin", args.prefix + ".idx", args.tokenizer_model):
        if path is not None and not Path(path).exists():
            parser.error(f"'{path}' does not exist")
    from megamoe.data.checks import read_index
    from megamoe.data.preprocess import describe_dataset

    try:
        read_index(args.prefix)  # a damaged index or .bin: say which, not numpy's "buffer is smaller than requested"
        info = describe_dataset(args.prefix, args.tokenizer_model, args.sample, args.sample_tokens)
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['prefix']}: {info['documents']:,} documents, {info['tokens']:,} tokens ({info['dtype']}); "
          f"tokens per document min {info['doc_tokens_min']}, mean {info['doc_tokens_mean']}, "
          f"max {info['doc_tokens_max']}")
    print(f"document {info['sample']}, first {len(info['sample_ids'])} ids: {info['sample_ids']}")
    if "sample_text" in info:
        print(f"decoded: {info['sample_text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
