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
import math
import statistics
from dataclasses import asdict
from pathlib import Path

from megamoe.studies.compare import DENSE, RunResult, result_from_dict, studies


def trend_runs() -> list[str]:
    """Dense and the runs the variants' studies compare with it along the run (Study.trend)."""
    return [DENSE, *(run for study in studies().values() for run in study.trend)]


def router_runs() -> list[str]:
    """The runs whose routers' split of the domains is measured (Study.routers)."""
    return [run for study in studies().values() for run in study.routers]


def routed_runs_present(v: dict[str, list[RunResult]]) -> list[str]:
    """router_runs() present in `v` with an expert load per held-out set."""
    return [n for n in router_runs() if n in v and v[n][0].expert_load]


def by_variant(results: list[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.variant, []).append(r)
    return out


def mean_ppl(runs: list[RunResult], key: str | None = None) -> float:
    return statistics.mean(r.extra[key] if key else r.valid_ppl for r in runs)


def mean_set_ppl(runs: list[RunResult], held_out: str) -> float:
    """Mean over seeds of the final perplexity on one held-out set."""
    return statistics.mean(r.set_ppl[held_out] for r in runs)


def domain_of(held_out: str) -> str:
    """A held-out set's domain name ('code' for code_held_out)."""
    return held_out.removesuffix("_held_out")


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
    budget = meta.get("budget", {})
    model = (f", d = {budget['hidden_size']}, {budget['num_layers']} layers, {budget['seq_length']}-token samples"
             if budget else "")
    lines = [f"# megamoe variant comparison (commit {meta['commit']}, seeds {seeds}, "
             f"{meta['tokens_per_run']:,} training tokens per run{model})", ""]
    if meta.get("command"):
        lines += [f"Regenerate: `{meta['command']}`", ""]
    lines += _corpus_section(meta.get("corpus_statistics") or {})
    held_out = list(results[0].set_ppl) if results and results[0].set_ppl else []
    domain_columns = "".join(f" {domain_of(h)} ppl |" for h in held_out)
    lines += [f"| variant | valid ppl (mean) | per seed |{domain_columns} spread over seeds | params "
              "| MoE-layer params | FFN madds/token | top-1 disabled ppl | tokens/s | minutes |",
              "|---|---|---|" + "---|" * len(held_out) + "---|---|---|---|---|---|---|"]
    for name, runs in v.items():
        robust = f"{mean_ppl(runs, 'valid_ppl_top1_disabled'):.1f}" if "valid_ppl_top1_disabled" in runs[0].extra \
            else ""
        per_seed = ", ".join(f"{r.valid_ppl:.1f}" for r in runs)
        domains = "".join(f" {mean_set_ppl(runs, h):.1f} ({', '.join(f'{r.set_ppl[h]:.1f}' for r in runs)}) |"
                          for h in held_out)
        speed = f"{statistics.mean(r.tokens_per_s for r in runs):,.0f}" if runs[0].tokens_per_s else ""
        lines.append(f"| {name} | {mean_ppl(runs):.1f} | {per_seed} |{domains} {spread(runs):.1f} | "
                     f"{runs[0].params_total:,} | {runs[0].moe_layer_params:,} | {runs[0].active_ffn_madds:,} | "
                     f"{robust} | {speed} | {statistics.mean(r.seconds for r in runs) / 60:.1f} |")
    lines += ["", "| claim | holds | numbers |", "|---|---|---|"]
    lines += [f"| {c} | {verdict} | {numbers} |" for c, verdict, numbers in claims(results)]
    lines += _trend_section(v, held_out)
    lines += _gaps_section(v)
    lines += _specialisation_section(v)
    lines += _paper_sections(v)
    total_s = sum(r.seconds for r in results)
    lines += ["", f"Wall time of the runs: {total_s / 3600:.2f} h in all ({len(results)} runs; commits "
                  f"{', '.join(sorted({r.commit for r in results if r.commit})) or meta['commit']})."]
    return "\n".join(lines) + "\n"


def _corpus_section(manifest: dict) -> list[str]:
    if not manifest.get("domains"):
        return []
    from megamoe.data.domains import summary

    return ["## Corpus", "", f"Recipe `{manifest.get('recipe', '')}`: {100 * manifest['held_out']:.0f} % of each "
            f"domain's documents held out (by a hash of the document), exact duplicates removed, a "
            f"{manifest['vocab_size']:,}-token {manifest['tokenizer_type']} trained on the training splits only; "
            "training blends the domains equally.", "", *summary(manifest), "", "## Results", ""]


def trend_points(runs: list[RunResult]) -> list[int]:
    """The steps at 1/4, 1/2 and all of the run that every seed evaluated (nearest evaluation at or after)."""
    steps = sorted(set.intersection(*(set(dict(r.curve)) for r in runs)) - {0})
    if not steps:
        return []
    last = steps[-1]
    return sorted({next(s for s in steps if s >= last * f) for f in (0.25, 0.5, 1.0)})


def ppl_at(runs: list[RunResult], step: int, held_out: str | None = None) -> float:
    """Mean over seeds of the held-out perplexity at `step` (pooled, or of one held-out set)."""
    return statistics.mean(math.exp(dict(r.set_curves[held_out] if held_out else r.curve)[step]) for r in runs)


def _trend_section(v: dict[str, list[RunResult]], held_out: list[str]) -> list[str]:
    present = [n for n in trend_runs() if n in v]
    if DENSE not in present or len(present) < 2:
        return []
    points = trend_points(v[DENSE])
    tokens_per_step = v[DENSE][0].tokens / max(points[-1], 1) if points else 0
    lines = ["", "Trend: held-out perplexity (mean over seeds) at 1/4, 1/2 and all of the budget; in brackets the "
             "gap to dense (negative: better than dense).", "",
             "| run | " + " | ".join(f"step {s} ({s * tokens_per_step / 1e6:.1f} M tokens)" for s in points) + " |",
             "|---|" + "---|" * len(points)]
    for name in present:
        cells = []
        for step in points:
            parts = [("all", None), *((domain_of(h), h) for h in held_out)]
            cells.append(", ".join(f"{label} {ppl_at(v[name], step, h):.1f}" + (
                f" ({100 * (ppl_at(v[name], step, h) / ppl_at(v[DENSE], step, h) - 1):+.1f} %)"
                if name != DENSE else "") for label, h in parts))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def gap_pairs() -> list[tuple[str, str, float]]:
    """(run, baseline, allowed) of every study's claims (Study.gaps), each once."""
    return list(dict.fromkeys(pair for study in studies().values() for pair in study.gaps))


def gap_points(runs: list[RunResult], baseline: list[RunResult]) -> list[tuple[int, float]]:
    """(step, gap) at every step after 0 that every run of both evaluated: the gap is runs' pooled held-out
    perplexity over the baseline's, minus 1, in %, on the means over seeds."""
    steps = sorted(set.intersection(*(set(dict(r.curve)) for r in [*runs, *baseline])) - {0})
    return [(step, 100 * (ppl_at(runs, step) / ppl_at(baseline, step) - 1)) for step in steps]


def gap_verdict(points: list[tuple[int, float]], tokens_per_step: float, allowed_pct: float) -> str:
    """How the gap moves over the second half of the run, from a least-squares line of the gap against
    log(tokens) through the evaluations there, and the budget at which that line reaches the allowed gap: for a
    claim that does not hold at the end, where it would; for one that holds with a shrinking margin, where it
    would stop. A straight line in log(tokens) is the simplest reading of a loss curve's tail: an
    extrapolation, not a prediction."""
    late = [(step, gap) for step, gap in points if step >= points[-1][0] / 2]
    if len(late) < 3:
        return "too few evaluations to read a trend"
    slope, intercept = statistics.linear_regression([math.log(step * tokens_per_step) for step, _ in late],
                                                    [gap for _, gap in late])
    move = f"{slope * math.log(2):+.1f} points per doubling of tokens over the second half"
    holds = points[-1][1] <= allowed_pct
    if holds and slope <= 0:
        return f"holds at the end ({move})"
    if not holds and slope >= 0:
        return f"does not hold, and the gap does not close ({move})"
    budget = math.exp((allowed_pct - intercept) / slope)
    reach = (f"the line reaches {allowed_pct:+.0f} % at about {budget / 1e6:,.0f} M tokens, "
             f"{budget / (points[-1][0] * tokens_per_step):,.1f}x this budget")
    if holds:
        return f"holds at the end, with a shrinking margin ({move}): {reach}"
    return f"does not hold yet; closing ({move}), {reach}"


def _gaps_section(v: dict[str, list[RunResult]]) -> list[str]:
    pairs = [(run, base, allowed) for run, base, allowed in gap_pairs() if run in v and base in v]
    if not pairs:
        return []
    points = {pair: gap_points(v[pair[0]], v[pair[1]]) for pair in pairs}
    steps = [step for step, _ in points[pairs[0]]]
    tokens_per_step = v[pairs[0][0]][0].tokens / max(steps[-1], 1) if steps else 0.0
    lines = ["", "Gaps along the run: each claim's comparison at every evaluation, the pooled held-out perplexity "
             "of the run over its baseline's (means over seeds; negative: the run is better), the final gap per "
             "seed, and how the gap moves with tokens (a least-squares line of the gap against log(tokens) over the "
             "second half of the run; where a claim does not hold, the budget at which that line would reach it, "
             "and where it holds with a shrinking margin, the budget at which it would stop holding).",
             "", "| run vs baseline | allowed | " + " | ".join(f"{s * tokens_per_step / 1e6:.2f} M" for s in steps)
             + " | end, per seed | trend |", "|---|---|" + "---|" * len(steps) + "---|---|"]
    for (run, base, allowed), gaps in points.items():
        by_step = dict(gaps)
        cells = " | ".join(f"{by_step[s]:+.1f} %" if s in by_step else "" for s in steps)
        seeds = sorted({r.seed for r in v[run]} & {r.seed for r in v[base]})
        per_seed = ", ".join(f"{100 * (_seed(v[run], s).valid_ppl / _seed(v[base], s).valid_ppl - 1):+.1f} %"
                             for s in seeds)
        verdict = gap_verdict(gaps, tokens_per_step, 100 * allowed) if gaps else ""
        lines.append(f"| {run} vs {base} | {100 * allowed:g} % | {cells} | {per_seed} | {verdict} |")
    return lines


def _seed(runs: list[RunResult], seed: int) -> RunResult:
    return next(r for r in runs if r.seed == seed)


def domain_information(load_by_set: dict[str, list[float]]) -> float:
    """I(expert; domain) in bits, the domains weighted equally, from each held-out set's share of a layer's copies
    per expert (p(e | d)): 0 when every domain uses the experts alike, at most 1 bit for two domains."""
    sets = list(load_by_set)
    experts = len(load_by_set[sets[0]])
    marginal = [statistics.mean(load_by_set[d][e] for d in sets) for e in range(experts)]
    return sum(load_by_set[d][e] / len(sets) * math.log2(load_by_set[d][e] / marginal[e])
               for d in sets for e in range(experts) if load_by_set[d][e] > 0)


def layer_loads(run: RunResult) -> dict[str, dict[str, list[float]]]:
    """MoE layer -> held-out set -> share of the layer's copies per expert."""
    out: dict[str, dict[str, list[float]]] = {}
    for held_out, layers in run.expert_load.items():
        for layer, share in layers.items():
            out.setdefault(layer, {})[held_out] = share
    return out


def _specialisation_section(v: dict[str, list[RunResult]]) -> list[str]:
    present = routed_runs_present(v)
    if not present:
        return []
    lines = ["", "Expert specialisation: mutual information between a copy's expert and its token's domain, in bits "
             "(0: the router sends both domains alike; 1: every expert serves one domain), per MoE layer on the "
             "held-out sets of the final model; mean over seeds (each seed). specialisation.png shows each expert's "
             "share of code tokens.", "", "| run | layer | I(expert; domain) bits |", "|---|---|---|"]
    for name in present:
        for layer in layer_loads(v[name][0]):
            values = [domain_information(layer_loads(r)[layer]) for r in v[name]]
            lines.append(f"| {name} | {layer} | {statistics.mean(values):.3f} "
                         f"({', '.join(f'{x:.3f}' for x in values)}) |")
    return lines


def _paper_sections(v: dict[str, list[RunResult]]) -> list[str]:
    """Each variant study's report of its paper's own evaluations."""
    return [line for study in studies().values() if study.report is not None for line in study.report(v)]


def read_results(path: Path) -> tuple[list[RunResult], dict]:
    """The runs and meta of a results.json that write_outputs wrote (to render them again)."""
    saved = json.loads(path.read_text())
    return [result_from_dict(run) for run in saved["runs"]], saved["meta"]


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
    _specialisation_plot(v, out_dir, plt)


def domain_share(load_by_set: dict[str, list[float]], held_out: str) -> list[float]:
    """Per expert, the share of its copies that come from `held_out`'s tokens, the sets weighted equally (NaN for an
    expert no set used)."""
    totals = [sum(load[e] for load in load_by_set.values()) for e in range(len(load_by_set[held_out]))]
    return [load / total if total > 0 else math.nan for load, total in zip(load_by_set[held_out], totals, strict=True)]


def _specialisation_plot(v: dict[str, list[RunResult]], out_dir: Path, plt) -> None:
    """specialisation.png: one panel per routed run (its first seed), a row per MoE layer, a cell per expert coloured
    by the share of the expert's copies that are the first domain's tokens (0.5: both domains alike)."""
    present = routed_runs_present(v)
    if not present:
        return
    rows = sum(len(layer_loads(v[n][0])) for n in present)
    fig, axes = plt.subplots(len(present), 1, figsize=(10, 1.1 * len(present) + 0.45 * rows + 0.6), squeeze=False,
                             layout="constrained")
    first = next(iter(v[present[0]][0].expert_load))
    image = None
    for ax, name in zip(axes[:, 0], present, strict=True):
        run = v[name][0]
        layers = layer_loads(run)
        rows = [domain_share(loads, first) for loads in layers.values()]
        width = max(len(r) for r in rows)
        grid = [r + [math.nan] * (width - len(r)) for r in rows]
        image = ax.imshow(grid, cmap="coolwarm", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_yticks(range(len(layers)), list(layers), fontsize=8)
        ax.set_xticks(range(width), [str(e) for e in range(width)], fontsize=7)
        bits = ", ".join(f"{domain_information(loads):.2f}" for loads in layers.values())
        ax.set_title(f"{name} (seed {run.seed}): I(expert; domain) per layer = {bits} bits", fontsize=9)
    axes[-1, 0].set_xlabel("expert")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label=f"share of {domain_of(first)} tokens")
    fig.savefig(out_dir / "specialisation.png", dpi=120)
    plt.close(fig)
