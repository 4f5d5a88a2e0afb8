"""PEER in the variant comparison: the middle block's MLP replaced by 16,384 single-neuron experts (8 heads x 8,
d_k = 56: about the dense FFN's multiply-adds), with query BatchNorm and without it; expert usage and unevenness
on the validation pass; the claim: below the dense model's perplexity at equal active compute."""

from __future__ import annotations

from pathlib import Path

from megamoe.studies.compare import DENSE
from megamoe.studies.compare_report import mean_ppl
from megamoe.variants.base import Study

PEER = ["moe.variant=peer", "moe.num_experts=16384", "moe.num_heads=8", "moe.topk_per_head=8", "moe.key_dim=56"]
QUICK = ["moe.num_experts=1024", "moe.num_heads=2", "moe.topk_per_head=4", "moe.key_dim=16"]
RUNS = ("peer", "peer_no_batchnorm")


def evaluate(name: str, trainer, final: dict, log_dir: Path) -> dict:
    """Usage and unevenness of the validation pass (the layer reports them as validation metrics)."""
    return {k.split("_")[-1]: v for k, v in final.items() if k.endswith(("_usage", "_unevenness"))}


def claims(v: dict) -> list[tuple[str, bool, str]]:
    if "peer" not in v or DENSE not in v:
        return []
    peer, dense = mean_ppl(v["peer"]), mean_ppl(v[DENSE])
    return [("PEER below dense at equal active FLOPs", peer < dense, f"PEER {peer:.1f} vs dense {dense:.1f}")]


def report(v: dict) -> list[str]:
    runs = [(n, r) for n in RUNS for r in v.get(n, [])]
    if not runs:
        return []
    lines = ["", "PEER expert usage and unevenness (validation):", "",
             "| run | seed | usage | unevenness (KL to uniform) |", "|---|---|---|---|"]
    return lines + [f"| {n} | {r.seed} | {100 * r.extra.get('usage', float('nan')):.1f} % | "
                    f"{r.extra.get('unevenness', float('nan')):.3f} |" for n, r in runs]


STUDY = Study(runs={"peer": PEER, "peer_no_batchnorm": [*PEER, "moe.query_norm=none"]},
              quick={name: QUICK for name in RUNS}, evaluate=evaluate, claims=claims, report=report, trend=("peer",),
              gaps=(("peer", DENSE, 0.0),))
