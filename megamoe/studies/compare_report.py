"""The comparison's outputs: a markdown table with the papers' claims marked, a JSON file, two PNG plots.

Claims (each variant's study states its paper's, megamoe/variants/<name>/study.py; judged on the mean over seeds
and on each seed alone: 'yes', 'no' or 'mixed'; 'spread' is max - min over seeds), e.g.:
- PEER (arXiv:2407.04153): below the dense model's perplexity at equal active compute.
- CartesianMoE (arXiv:2410.16077): Cartesian <= fine-grained + shared <= top-2, and the smallest relative
  perplexity increase with each token's top-1 expert disabled.
- MPOE (arXiv:2203.01104): within 5 % of Switch's perplexity with a fraction of its MoE-layer parameters.
- DA-MoE (arXiv:2409.06669): at or below top-k at equal mean K (GPT, and the encoder pair).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from megamoe.studies.compare import RunResult, studies


def by_variant(results: list[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.variant, []).append(r)
    return out


def mean_ppl(runs: list[RunResult], key: str | None = None) -> float:
    return statistics.mean(r.extra[key] if key else r.valid_ppl for r in runs)


def spread(runs: list[RunResult], key: str | None = None) -> float:
    values = [r.extra[key] if key else r.valid_ppl for r in runs]
    return max(values) - min(values)


def claims(results: list[RunResult]) -> list[tuple[str, str, str]]:
    """(claim, verdict, the numbers) for each paper's claim whose runs are present. The numbers are means over
    seeds; the verdict is 'yes' when the claim holds on the means and on every seed alone, 'no' when on none of
    them, otherwise 'mixed' naming the seeds where it holds (a difference within the seeds' spread)."""
    seeds = sorted({r.seed for r in results})
    on_mean = _claims(by_variant(results))
    per_seed = {seed: dict((c, ok) for c, ok, _ in _claims(by_variant([r for r in results if r.seed == seed])))
                for seed in seeds}
    out = []
    for claim, ok, numbers in on_mean:
        holds_on = [seed for seed in seeds if per_seed[seed].get(claim)]
        if len(seeds) == 1 or (ok and len(holds_on) == len(seeds)) or (not ok and not holds_on):
            verdict = "yes" if ok else "no"
        else:
            verdict = f"mixed: {'yes' if ok else 'no'} on the means, holds for seed(s) {holds_on} of {seeds}"
        out.append((claim, verdict, numbers))
    return out


def _claims(v: dict[str, list[RunResult]]) -> list[tuple[str, bool, str]]:
    """(claim, holds on the means of `v`'s runs, the numbers): each variant's study judges its paper's claims."""
    return [claim for study in studies().values() if study.claims is not None for claim in study.claims(v)]


def markdown(results: list[RunResult], meta: dict) -> str:
    v = by_variant(results)
    seeds = sorted({r.seed for r in results})
    lines = [f"# megamoe variant comparison (commit {meta['commit']}, seeds {seeds}, "
             f"{meta['tokens_per_run']:,} training tokens per run)", "",
             "| variant | valid ppl (mean) | spread over seeds | params | MoE-layer params | FFN madds/token | "
             "top-1 disabled ppl | minutes |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in v.items():
        robust = f"{mean_ppl(runs, 'valid_ppl_top1_disabled'):.1f}" if "valid_ppl_top1_disabled" in runs[0].extra \
            else ""
        lines.append(f"| {name} | {mean_ppl(runs):.1f} | {spread(runs):.1f} | {runs[0].params_total:,} | "
                     f"{runs[0].moe_layer_params:,} | {runs[0].active_ffn_madds:,} | {robust} | "
                     f"{statistics.mean(r.seconds for r in runs) / 60:.1f} |")
    lines += ["", "| claim | holds | numbers |", "|---|---|---|"]
    lines += [f"| {c} | {verdict} | {numbers} |" for c, verdict, numbers in claims(results)]
    lines += _paper_sections(v)
    return "\n".join(lines) + "\n"


def _paper_sections(v: dict[str, list[RunResult]]) -> list[str]:
    """Each variant study's report of its paper's own evaluations."""
    return [line for study in studies().values() if study.report is not None for line in study.report(v)]


def read_results(path: Path) -> tuple[list[RunResult], dict]:
    """The runs and meta of a results.json that write_outputs wrote (to render them again)."""
    saved = json.loads(path.read_text())
    runs = [RunResult(**{**run, "curve": [tuple(point) for point in run["curve"]]}) for run in saved["runs"]]
    return runs, saved["meta"]


def write_outputs(results: list[RunResult], meta: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(markdown(results, meta))
    (out_dir / "results.json").write_text(json.dumps(
        {"meta": meta, "claims": [{"claim": c, "holds": verdict, "numbers": n} for c, verdict, n in claims(results)],
         "runs": [asdict(r) for r in results]}, indent=1))
    _plots(results, out_dir)


def objective_of(run: RunResult) -> str:
    return "masked LM" if "model.objective=masked_lm" in run.overrides else "causal LM"


def seed_band(runs: list[RunResult]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every seed evaluated at, and the mean, min and max validation loss over the seeds there."""
    curves = [dict(run.curve) for run in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    losses = [[c[step] for c in curves] for step in steps]
    return steps, [statistics.mean(x) for x in losses], [min(x) for x in losses], [max(x) for x in losses]


def _plots(results: list[RunResult], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = by_variant(results)
    # Causal-LM and masked-LM losses measure different things: one panel each.
    panels = {objective: names for objective in ("causal LM", "masked LM")
              if (names := [n for n, runs in v.items() if objective_of(runs[0]) == objective])}
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    seeds = sorted({r.seed for r in results})
    for ax, (objective, names) in zip(axes[0], panels.items(), strict=True):
        for name in names:
            steps, mean, low, high = seed_band(v[name])
            (line,) = ax.plot(steps, mean, label=name)
            if len(v[name]) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set(xlabel="step", ylabel="validation loss", title=f"{objective}: mean over seeds {seeds} (band: min-max)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(v)
    ax.bar(names, [mean_ppl(v[n]) for n in names], yerr=[spread(v[n]) / 2 for n in names], capsize=3)
    ax.set(ylabel="validation perplexity", title="final validation perplexity (mean, bars: spread over seeds)")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "final_ppl.png", dpi=120)
    plt.close(fig)
