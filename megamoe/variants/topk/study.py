"""Top-k runs in the variant comparison: GShard top-2 (the baseline of DA-MoE and CartesianMoE), fine-grained +
shared, Switch top-1 (MPOE's baseline) and a top-2 encoder; top-2 and fine-grained also evaluated with each
token's top-1 expert disabled (CartesianMoE's robustness test). The claim: the basic one of MoE (GShard, Switch,
DeepSeekMoE), top-k MoE below the dense model's perplexity at equal active compute, for top-2, fine-grained +
shared and Switch."""

from __future__ import annotations

from pathlib import Path

from megamoe.studies.compare import DENSE, evaluate_without_top1
from megamoe.studies.compare_report import domain_of, mean_ppl, mean_set_ppl
from megamoe.variants.base import Study

TOP2 = ["moe.num_experts=8", "moe.router_topk=2", "moe.ffn_hidden_size=176"]
ROBUSTNESS = ("top2", "fine_grained_shared")
MOE_CLAIM = {"top2": "top-2", "fine_grained_shared": "fine-grained + shared", "switch": "Switch (top-1)"}
TREND = ("top2", "fine_grained_shared")


def evaluate(name: str, trainer, final: dict, log_dir: Path) -> dict:
    return {"valid_ppl_top1_disabled": evaluate_without_top1(trainer)} if name in ROBUSTNESS else {}


def claims(v: dict) -> list[tuple[str, bool, str]]:
    """Top-2, fine-grained + shared and Switch below dense, each judged on the pooled held-out perplexity (per-domain
    perplexities in the numbers, where the data has domains)."""
    if DENSE not in v:
        return []
    out = []
    for name, label in MOE_CLAIM.items():
        if name in v:
            moe, dense = mean_ppl(v[name]), mean_ppl(v[DENSE])
            domains = "".join(f"; {domain_of(d)}: {mean_set_ppl(v[name], d):.1f} vs {mean_set_ppl(v[DENSE], d):.1f}"
                              for d in v[name][0].set_ppl)
            out.append((f"MoE: {label} below dense at equal active compute", moe < dense,
                        f"{label} {moe:.1f} vs dense {dense:.1f}{domains}"))
    return out


STUDY = Study(runs={"top2": TOP2,
                    "fine_grained_shared": ["moe.num_experts=16", "moe.router_topk=4", "moe.ffn_hidden_size=64",
                                            "moe.shared_expert_intermediate_size=96"],
                    "switch": ["moe.num_experts=8", "moe.router_topk=1", "moe.router_pre_softmax=true",
                               "moe.router_bias=true", "moe.router_gate=unit_st"],
                    "top2_encoder": [*TOP2, "model.objective=masked_lm"]},
              evaluate=evaluate, claims=claims, trend=TREND, routers=TREND,
              gaps=tuple((name, DENSE, 0.0) for name in MOE_CLAIM))
