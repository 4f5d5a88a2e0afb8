"""CartesianMoE in the variant comparison: two sub-layers, each top-2 over 8 experts of F/4 plus a shared expert
(equal active compute with top-2 and fine-grained + shared); evaluated with each token's top-1 expert disabled.
Claims: Cartesian <= fine-grained + shared <= top-2, and the smallest rise with the top-1 expert disabled."""

from __future__ import annotations

import itertools
from pathlib import Path

from megamoe.studies.compare import evaluate_without_top1
from megamoe.studies.compare_report import mean_ppl
from megamoe.variants.base import Study

COMPARED = ("cartesian", "fine_grained_shared", "top2")
"""This run and its two baselines (the top-k study's runs)."""


def evaluate(name: str, trainer, final: dict, log_dir: Path) -> dict:
    return {"valid_ppl_top1_disabled": evaluate_without_top1(trainer)}


def claims(v: dict) -> list[tuple[str, bool, str]]:
    if not all(n in v for n in COMPARED):
        return []
    c, f, t = (mean_ppl(v[n]) for n in COMPARED)
    rise = {n: mean_ppl(v[n], "valid_ppl_top1_disabled") / mean_ppl(v[n]) - 1 for n in COMPARED}
    return [("Cartesian <= fine-grained + shared <= top-2", c <= f <= t,
             f"Cartesian {c:.1f}, fine-grained + shared {f:.1f}, top-2 {t:.1f}"),
            ("Cartesian the most robust with the top-1 expert disabled", min(rise, key=rise.get) == "cartesian",
             ", ".join(f"{n} +{100 * r:.0f} %" for n, r in rise.items()))]


STUDY = Study(runs={"cartesian": ["moe.variant=cartesian", "moe.num_experts=8", "moe.router_topk=2",
                                  "moe.ffn_hidden_size=64", "moe.shared_expert_intermediate_size=48"]},
              evaluate=evaluate, claims=claims, routers=("cartesian",),
              gaps=tuple((run, baseline, 0.0) for run, baseline in itertools.pairwise(COMPARED)))
