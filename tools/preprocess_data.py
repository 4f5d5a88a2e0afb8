"""Tokenize a corpus into Megatron indexed datasets, training the tokenizer first if asked.

  python tools/preprocess_data.py --input data/shakespeare-train.jsonl.gz --output-prefix data/processed/shakespeare \
      --train-tokenizer --vocab-size 4000 [--tokenizer-type HuggingFaceTokenizer] [--special-tokens <a> <b>] \
      [--workers 4]
writes data/processed/shakespeare.model (a sentencepiece tokenizer; with --tokenizer-type HuggingFaceTokenizer a
byte-level BPE, shakespeare.tokenizer.json) and data/processed/shakespeare_text_document.{bin,idx}
(megatron.core.datasets' format: Megatron-LM's tools read them). Trained tokenizers are lossless: line breaks,
tabs, indentation and every character survive encode + decode (--normalize: the older, normalising sentencepiece
model). With --tokenizer-model, an existing tokenizer: a sentencepiece .model, or a tokenizer.json (or a directory
holding one) with --tokenizer-type HuggingFaceTokenizer.

Inputs are .jsonl, .jsonl.gz or .txt files (a line is a document; --json-keys a b: one dataset per key,
<prefix>_a_document and <prefix>_b_document) or directories: a tree of text or source files, each file one document
kept byte for byte, e.g. a code base:

  python tools/preprocess_data.py --input ~/src/project --include '*.py' '*.md' --output-prefix data/processed/code \
      --tokenizer-model data/processed/shakespeare.model

Files over --max-file-bytes, not UTF-8, binary, empty or exact duplicates of one read before are skipped and
counted; hidden entries (.git, .venv) below the directory are left out. The end-of-document token is appended to
every document (Megatron-LM's --append-eod, on by default here; --no-append-eod turns it off). Prints documents,
tokens, tokens/s and what was skipped. Inspect the result with tools/inspect_dataset.py; blend several with
data.data_path=[w1, prefix1, w2, prefix2].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli
from megamoe.data import preprocess
from megamoe.data.corpus import DEFAULT_MAX_FILE_BYTES, Corpus
from megamoe.data.tokenizer import TOKENIZER_TYPES, kind_of, tokenizer_problem

LEGACY_ALGORITHMS = ("bpe", "unigram")

MIN_VOCAB = 8  # pad, unk, bos, eos, <mask> and a few pieces (sentencepiece refuses fewer)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl, .jsonl.gz or .txt files, or directories of text or source files")
    parser.add_argument("--output-prefix", required=True, help="output path prefix")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON fields holding document text: one dataset per key (default: text)")
    parser.add_argument("--include", nargs="+", default=[],
                        help="a directory's files to read: name or relative-path patterns (default: all files)")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help="a directory's larger files are skipped (default %(default)s; 0: no limit)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the end-of-document token (default: on)")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer-model", help="an existing tokenizer: a sentencepiece .model, or a tokenizer.json or "
                                               "a directory holding one (HuggingFaceTokenizer)")
    tok.add_argument("--train-tokenizer", action="store_true",
                     help="train a tokenizer on the input first (<output-prefix>.model or .tokenizer.json)")
    parser.add_argument("--tokenizer-type", choices=[*TOKENIZER_TYPES, *LEGACY_ALGORITHMS],
                        help="Megatron-LM's tokenizer names (default: what --tokenizer-model is, by its name: a "
                             ".json or a directory is HuggingFaceTokenizer; for training SentencePieceTokenizer)")
    parser.add_argument("--vocab-size", type=int, default=4000, help="vocabulary of a trained tokenizer")
    parser.add_argument("--tokenizer-algorithm", choices=["bpe", "unigram"], default="bpe",
                        help="a trained sentencepiece model's algorithm (a Hugging Face one is a byte-level BPE)")
    parser.add_argument("--normalize", action="store_true",
                        help="train a sentencepiece model that normalises text (NFKC, whitespace collapsed, line "
                             "breaks lost) instead of a lossless one")
    parser.add_argument("--special-tokens", nargs="*", default=[], help="extra pieces a trained tokenizer never splits")
    parser.add_argument("--no-byte-fallback", action="store_true",
                        help="a trained tokenizer maps unknown characters to <unk> instead of UTF-8 bytes")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    args = parser.parse_args(argv)
    if args.tokenizer_type in LEGACY_ALGORITHMS:  # before Megatron's names, --tokenizer-type was the algorithm
        args.tokenizer_algorithm, args.tokenizer_type = args.tokenizer_type, "SentencePieceTokenizer"
    if args.tokenizer_type is None:
        args.tokenizer_type = kind_of(args.tokenizer_model) if args.tokenizer_model else "SentencePieceTokenizer"
    if args.normalize and args.tokenizer_type == "HuggingFaceTokenizer":
        parser.error("--normalize applies to sentencepiece training; a byte-level BPE keeps every byte")
    if args.workers < 1:
        parser.error(f"--workers {args.workers} must be >= 1")
    if args.max_file_bytes < 0:
        parser.error(f"--max-file-bytes {args.max_file_bytes} must be >= 0 (0: no limit)")
    corpus = Corpus(tuple(args.input), tuple(args.json_keys), tuple(args.include), args.max_file_bytes)
    if problem := corpus.problem():
        parser.error(problem)
    if args.tokenizer_model and (problem := tokenizer_problem(args.tokenizer_model, args.tokenizer_type)):
        parser.error(f"--tokenizer-model {problem}")
    if args.train_tokenizer and args.vocab_size < MIN_VOCAB:
        parser.error(f"--vocab-size {args.vocab_size} must be at least {MIN_VOCAB} (the special pieces and bytes)")
    try:
        model, report = run(args, corpus)
    except (ValueError, OSError) as err:  # an empty corpus, a line that is not JSON, a file system refusing
        if isinstance(err, OSError) and err.strerror:  # not "[Errno 28] ..."
            err = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
        return cli.fail("preprocess_data", f"{err}; nothing was written")
    if args.train_tokenizer:
        kind = "byte-level BPE" if args.tokenizer_type == "HuggingFaceTokenizer" else args.tokenizer_algorithm
        print(f"tokenizer: {model} ({args.vocab_size} {kind} pieces)")
    print(f"dataset: {', '.join(p + '.bin/.idx' for p in report.prefixes)}  {report.documents:,} documents, "
          f"{report.tokens:,} tokens in {report.seconds:.1f} s = {report.tokens_per_s:,.0f} tokens/s with "
          f"{args.workers} worker(s)")
    stats = report.stats
    if stats.files_kept or stats.skipped_files:
        print(f"files: {stats.files_kept:,} kept, {sum(stats.skipped_files.values()):,} skipped"
              + (f": {stats.skipped_summary()}" if stats.skipped_files else ""))
    if report.meta_symbol_documents:
        print(f"warning: {report.meta_symbol_documents:,} document(s) hold U+2581 '\u2581', sentencepiece's own "
              "space symbol, which decodes as a space; --tokenizer-type HuggingFaceTokenizer keeps it",
              file=sys.stderr)
    if report.skipped_lines:
        print(f"skipped {report.skipped_lines:,} input line(s) that are not UTF-8 (the first at "
              f"{stats.first_skipped})", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, corpus: Corpus) -> tuple[str, preprocess.EncodeReport]:
    """The tokenizer (trained if asked) and the datasets, published together only when all are complete."""
    with preprocess.Staging() as staging:
        model = final_model = args.tokenizer_model
        if args.train_tokenizer:
            model = preprocess.train_tokenizer(corpus, args.output_prefix, args.vocab_size, args.tokenizer_algorithm,
                                               tuple(args.special_tokens), not args.no_byte_fallback, staging,
                                               args.tokenizer_type, args.normalize)
            final_model = preprocess.published_name(model, staging)
        report = preprocess.encode_corpus(corpus, model, args.output_prefix, workers=args.workers,
                                          progress=sys.stderr.isatty(), staging=staging, tokenizer_name=final_model,
                                          tokenizer_type=args.tokenizer_type, append_eod=args.append_eod)
    return final_model, report


if __name__ == "__main__":
    sys.exit(main())
