"""Train every MoE variant at equal active FFN compute and report the papers' comparisons (megamoe/studies/compare.py).

  python tools/compare_variants.py [--out runs/compare] [--seeds 1 2] [--corpus data/shakespeare-train.jsonl.gz]
                                   [--variants dense top2 ...] [--quick]
  python tools/compare_variants.py --recipe code-prose --budget large --out docs/results/code-prose \
                                   --work runs/code-prose
  python tools/compare_variants.py --from-results runs/compare/results.json --out runs/compare
The default (two seeds, 300 steps x 16 x 128 tokens per run, 11 runs per seed) takes about an hour on a 2-core CPU;
--quick (a 2-layer d=64 model, 6 steps, one seed) checks the pipeline in a few minutes, not the science.
--recipe code-prose trains on a two-domain corpus (this environment's Python sources and the sample prose, built
into <work>/data by tools/build_corpus.py's recipe) and reports perplexity per domain, the trend of the gaps along
the run and how the routers split the domains; --budget large gives every run 5.2 M tokens (about 5 hours for
both seeds on a 2-core CPU). Each finished run's result is kept in <work>/runs/<run>-seed<s>/result.json (with
--work apart, also in <out>/runs/<run>-seed<s>.json): run the command again and it trains only what is missing
(stop it at any time).
Writes <out>/report.md, results.json and PNG plots (seeds, overrides and the git commit in them) and prints the
report; --from-results renders an earlier run's results.json again, training nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from megamoe.studies import compare, corpus_recipes

    parser = cli.parser(__doc__)
    parser.add_argument("--out", default="runs/compare", help="output directory of the report")
    parser.add_argument("--work", help="where the runs and the tokenized corpus go (default: --out)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--corpus", default=str(ROOT / "data" / "shakespeare-train.jsonl.gz"),
                        help=".jsonl/.jsonl.gz/.txt corpus (tokenizer trained on it; 5 %% held out for validation)")
    source.add_argument("--recipe", choices=sorted(corpus_recipes.RECIPES),
                        help="a corpus of several domains with a held-out set each (tools/build_corpus.py)")
    parser.add_argument("--budget", choices=sorted(compare.BUDGETS), help="model size and tokens per run "
                        "(default: 'default'; --quick: 'quick')")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 1 2 (--quick: 1)")
    runs = list(compare.study_runs())
    parser.add_argument("--variants", nargs="+", choices=runs, default=runs, help="runs of the comparison")
    parser.add_argument("--quick", action="store_true", help="a few minutes: checks the pipeline, not the science")
    parser.add_argument("--from-results", metavar="RESULTS_JSON",
                        help="train nothing: write the report and plots of an earlier run's results.json to --out")
    args = parser.parse_args(argv)
    from megamoe.studies import compare_report
    from megamoe.train import startup

    if args.from_results:
        if not Path(args.from_results).is_file():
            parser.error(f"--from-results {args.from_results} does not exist")
        compare_report.write_outputs(*compare_report.read_results(Path(args.from_results)), Path(args.out))
        print((Path(args.out) / "report.md").read_text())
        return 0
    if not args.recipe and not Path(args.corpus).is_file():
        parser.error(f"--corpus {args.corpus} does not exist")

    startup.set_runtime_environment(cuda_available=False)
    out, work = Path(args.out), Path(args.work or args.out)
    budget = compare.BUDGETS[args.budget or ("quick" if args.quick else "default")]
    seeds = args.seeds or ([1] if args.quick else [1, 2])
    vocab_size = 1000 if args.quick else 4000
    if args.recipe:
        data = compare.prepare_recipe(args.recipe, work / "data" / args.recipe, vocab_size=vocab_size)
    else:
        data = compare.prepare_data(args.corpus, work / "data", vocab_size=vocab_size)
    commit = compare.git_commit(ROOT, outputs=(out, work))
    meta = {"commit": commit, "seeds": seeds, "corpus": args.recipe or args.corpus, "quick": args.quick,
            "budget": budget.__dict__, "tokens_per_run": budget.tokens, "variants": args.variants,
            "command": " ".join(["python", "tools/compare_variants.py", *(argv if argv is not None else sys.argv[1:])]),
            "corpus_statistics": data.corpus if args.recipe else {}}
    # With --work apart, each run's result is also kept beside the report (out/runs/): a later call, in this
    # checkout or another, trains only what is missing. The report is rewritten after every run.
    results = compare.run_comparison(data, work, seeds, budget, args.variants, quick=args.quick, commit=commit,
                                     keep_dir=out if work != out else None,
                                     on_result=lambda done: compare_report.write_outputs(done, meta, out))
    compare_report.write_outputs(results, meta, out)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
