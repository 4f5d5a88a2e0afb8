"""Top-k runs in the variant comparison: GShard top-2 (the baseline of DA-MoE and CartesianMoE), fine-grained +
shared, Switch top-1 (MPOE's baseline) and a top-2 encoder; top-2 and fine-grained also evaluated with each
token's top-1 expert disabled (CartesianMoE's robustness test)."""

from __future__ import annotations

from pathlib import Path

from megamoe.studies.compare import evaluate_without_top1
from megamoe.variants.base import Study

TOP2 = ["moe.num_experts=8", "moe.router_topk=2", "moe.ffn_hidden_size=176"]
ROBUSTNESS = ("top2", "fine_grained_shared")


def evaluate(name: str, trainer, final: dict, log_dir: Path) -> dict:
    return {"valid_ppl_top1_disabled": evaluate_without_top1(trainer)} if name in ROBUSTNESS else {}


STUDY = Study(runs={"top2": TOP2,
                    "fine_grained_shared": ["moe.num_experts=16", "moe.router_topk=4", "moe.ffn_hidden_size=64",
                                            "moe.shared_expert_intermediate_size=96"],
                    "switch": ["moe.num_experts=8", "moe.router_topk=1", "moe.router_pre_softmax=true",
                               "moe.router_bias=true", "moe.router_gate=unit_st"],
                    "top2_encoder": [*TOP2, "model.objective=masked_lm"]},
              evaluate=evaluate)
