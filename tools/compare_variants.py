"""Train every MoE variant at equal active FFN compute and report the papers' comparisons (megamoe/train/compare.py).

  python tools/compare_variants.py [--out runs/compare] [--seeds 1 2] [--corpus data/shakespeare-train.jsonl.gz]
                                   [--variants dense top2 ...] [--quick]
The default (two seeds, 300 steps x 16 x 128 tokens per run, 11 runs per seed) takes about an hour on a 2-core CPU;
--quick (a 2-layer d=64 model, 6 steps, one seed) checks the pipeline in a few minutes, not the science.
Writes <out>/report.md, results.json, loss_curves.png and final_ppl.png (seeds, overrides and the git commit in
them) and prints the report.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from megamoe.train import compare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/compare", help="output directory")
    parser.add_argument("--corpus", default=str(ROOT / "data" / "shakespeare-train.jsonl.gz"),
                        help=".jsonl/.jsonl.gz/.txt corpus (tokenizer trained on it; 5 %% held out for validation)")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 1 2 (--quick: 1)")
    parser.add_argument("--variants", nargs="+", choices=list(compare.VARIANTS), default=list(compare.VARIANTS))
    parser.add_argument("--quick", action="store_true", help="a few minutes: checks the pipeline, not the science")
    args = parser.parse_args(argv)
    if not Path(args.corpus).is_file():
        parser.error(f"--corpus {args.corpus} does not exist")
    from megamoe.train import compare_report, startup

    startup.set_runtime_environment(cuda_available=False)
    out = Path(args.out)
    budget = compare.QUICK if args.quick else compare.DEFAULT
    seeds = args.seeds or ([1] if args.quick else [1, 2])
    prefix, tokenizer = prepare_data(args.corpus, out / "data", vocab_size=1000 if args.quick else 4000)
    results = compare.run_comparison(prefix, tokenizer, out, seeds, budget, args.variants, quick=args.quick)
    meta = {"commit": git_commit(), "seeds": seeds, "corpus": args.corpus, "quick": args.quick,
            "budget": budget.__dict__, "tokens_per_run": budget.tokens, "variants": args.variants}
    compare_report.write_outputs(results, meta, out)
    print((out / "report.md").read_text())
    return 0


def prepare_data(corpus: str, data_dir: Path, vocab_size: int) -> tuple[str, str]:
    """A sentencepiece model trained on the corpus and its indexed dataset (reused when present)."""
    from megamoe.data import preprocess

    tokenizer = data_dir / "corpus.model"
    prefix = f"{data_dir / 'corpus'}_text_document"
    if not tokenizer.is_file() or not Path(prefix + ".idx").is_file():
        tokenizer = Path(preprocess.train_tokenizer([corpus], str(data_dir / "corpus"), vocab_size=vocab_size))
        prefix = preprocess.encode_corpus([corpus], str(tokenizer), str(data_dir / "corpus")).prefix
    return prefix, str(tokenizer)


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "") if commit.returncode == 0 \
        else "unknown"


if __name__ == "__main__":
    sys.exit(main())
