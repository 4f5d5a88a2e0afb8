"""Build a corpus of several domains with a held-out split per domain (megamoe/data/domains.py).

  python tools/build_corpus.py --recipe code-prose --out data/processed/code-prose
      the Python sources of this environment's installed packages (site-packages, *.py) as 'code' and the sample
      corpus (data/shakespeare-train.jsonl.gz) as 'prose'
  python tools/build_corpus.py --domain code=~/src/a,~/src/b --domain prose=books.jsonl.gz --include '*.py' \
      --out data/processed/mine [--held-out 0.05] [--vocab-size 4096] [--tokenizer-type HuggingFaceTokenizer]

Exact duplicates are removed across domains, each document goes to the training or the held-out split by a hash of
its text, and the tokenizer is trained on the training splits only. Writes <out>/<domain>_train_text_document and
<out>/<domain>_held_out_text_document (.bin/.idx), the tokenizer and corpus.json (documents, bytes, tokens per
domain and split), and prints them. Train on it with
  data.data_path=[0.5, <out>/code_train_text_document, 0.5, <out>/prose_train_text_document]
  data.valid_data_path=[<out>/code_held_out_text_document, <out>/prose_held_out_text_document]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli
from megamoe.data import domains
from megamoe.data.corpus import DEFAULT_MAX_FILE_BYTES, Corpus
from megamoe.data.tokenizer import TOKENIZER_TYPES


def main(argv: list[str] | None = None) -> int:
    from megamoe.studies import corpus_recipes

    parser = cli.parser(__doc__)
    parser.add_argument("--out", required=True, help="output directory (must not hold a corpus already)")
    parser.add_argument("--recipe", choices=sorted(corpus_recipes.RECIPES), help="a named set of domains")
    parser.add_argument("--domain", action="append", default=[], metavar="NAME=PATH[,PATH...]",
                        help="a domain and its inputs (.jsonl, .jsonl.gz, .txt files or directories); repeat")
    parser.add_argument("--include", nargs="+", default=[], help="a directory's files to read (default: all)")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help="a directory's larger files are skipped (default %(default)s; 0: no limit)")
    parser.add_argument("--held-out", type=float, default=0.05, help="share of each domain's documents held out")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="HuggingFaceTokenizer",
                        help="a byte-level BPE (default) or a sentencepiece model")
    parser.add_argument("--workers", type=int, default=2, help="tokenizing processes")
    args = parser.parse_args(argv)
    if bool(args.recipe) == bool(args.domain):
        parser.error("give either --recipe or --domain NAME=PATH (at least one)")
    if args.recipe:
        chosen = corpus_recipes.RECIPES[args.recipe]()
    else:
        chosen = [_domain(parser, spec, tuple(args.include), args.max_file_bytes) for spec in args.domain]
    for domain in chosen:
        if problem := domain.corpus.problem():
            parser.error(f"domain '{domain.name}': {problem}")
    if (Path(args.out) / domains.MANIFEST).exists():
        parser.error(f"--out {args.out} already holds a corpus ({domains.MANIFEST}); remove it or choose another")
    try:
        manifest = domains.build(chosen, args.out, args.held_out, args.vocab_size, args.tokenizer_type, args.workers)
    except (ValueError, OSError) as err:
        return cli.fail("build_corpus", f"{err}; nothing was written")
    print("\n".join(domains.summary(manifest)))
    print(f"\ntokenizer: {manifest['tokenizer_model']}\nmanifest: {Path(args.out) / domains.MANIFEST}")
    return 0


def _domain(parser, spec: str, include: tuple[str, ...], max_file_bytes: int) -> domains.Domain:
    name, _, paths = spec.partition("=")
    if not name or not paths or not name.isidentifier():
        parser.error(f"--domain {spec}: expected NAME=PATH[,PATH...] with a name of letters, digits and _")
    inputs = tuple(str(Path(p).expanduser()) for p in paths.split(","))
    return domains.Domain(name, Corpus(inputs, include=include, max_file_bytes=max_file_bytes))


if __name__ == "__main__":
    sys.exit(main())
