"""The comparison's outputs: a markdown table with the papers' claims marked, a JSON file, two PNG plots.

Claims (judged on the mean over seeds and on each seed alone: 'yes', 'no' or 'mixed'; 'spread' is max - min
over seeds):
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

from megamoe.train.compare import RunResult

MPOE_TOLERANCE = 0.05


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
    """(claim, holds on the means of `v`'s runs, the numbers)."""
    out = []

    def have(*names: str) -> bool:
        return all(name in v for name in names)

    if have("peer", "dense"):
        peer, dense = mean_ppl(v["peer"]), mean_ppl(v["dense"])
        out.append(("PEER below dense at equal active FLOPs", peer < dense, f"PEER {peer:.1f} vs dense {dense:.1f}"))
    if have("cartesian", "fine_grained_shared", "top2"):
        c, f, t = (mean_ppl(v[n]) for n in ("cartesian", "fine_grained_shared", "top2"))
        out.append(("Cartesian <= fine-grained + shared <= top-2", c <= f <= t,
                    f"Cartesian {c:.1f}, fine-grained + shared {f:.1f}, top-2 {t:.1f}"))
        rise = {n: mean_ppl(v[n], "valid_ppl_top1_disabled") / mean_ppl(v[n]) - 1
                for n in ("cartesian", "fine_grained_shared", "top2")}
        out.append(("Cartesian the most robust with the top-1 expert disabled",
                    min(rise, key=rise.get) == "cartesian",
                    ", ".join(f"{n} +{100 * r:.0f} %" for n, r in rise.items())))
    if have("mpo", "switch"):
        m, s = mean_ppl(v["mpo"]), mean_ppl(v["switch"])
        ratio = v["switch"][0].moe_layer_params / v["mpo"][0].moe_layer_params
        out.append((f"MPOE within {100 * MPOE_TOLERANCE:.0f} % of Switch at a fraction of the parameters",
                    m <= s * (1 + MPOE_TOLERANCE) and ratio > 1,
                    f"MPOE {m:.1f} vs Switch {s:.1f}; Switch's MoE layers hold {ratio:.1f}x MPOE's parameters"))
    for dynamic, topk in (("dynamic", "top2"), ("dynamic_encoder", "top2_encoder")):
        if have(dynamic, topk):
            d, t = mean_ppl(v[dynamic]), mean_ppl(v[topk])
            out.append((f"DA-MoE ({dynamic}) at or below top-k at equal mean K", d <= t,
                        f"DA-MoE {d:.1f} vs top-2 {t:.1f}"))
    return out


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
    lines = []
    peers = [(n, r) for n in ("peer", "peer_no_batchnorm") for r in v.get(n, [])]
    if peers:
        lines += ["", "PEER expert usage and unevenness (validation):", "",
                  "| run | seed | usage | unevenness (KL to uniform) |", "|---|---|---|---|"]
        lines += [f"| {n} | {r.seed} | {100 * r.extra.get('usage', float('nan')):.1f} % | "
                  f"{r.extra.get('unevenness', float('nan')):.3f} |" for n, r in peers]
    for name in ("dynamic", "dynamic_encoder"):
        if name in v:
            run = v[name][0]
            hist = ", ".join(f"K={k}: {100 * share:.0f} %" for k, share in enumerate(run.extra["k_histogram"]))
            lines += ["", f"DA-MoE {name}: K histogram (last training step, seed {run.seed}): {hist}", ""]
            for sentence in run.extra["importance"]:
                lines.append("    " + " ".join(f"{piece}({s:.2f},K={k})" for piece, s, k in sentence))
    return lines


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


def _plots(results: list[RunResult], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = by_variant(results)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in v.items():
        steps, losses = zip(*runs[0].curve, strict=True) if runs[0].curve else ((), ())
        ax.plot(steps, losses, label=name)
    ax.set(xlabel="step", ylabel="validation loss", title=f"validation loss (seed {results[0].seed})")
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
