"""MPOE in the variant comparison: Switch's router and experts (top-1 over 8 experts of F) as MPOs; the claim:
within 5 % of Switch's perplexity with a fraction of its MoE-layer parameters."""

from __future__ import annotations

from megamoe.studies.compare_report import mean_ppl
from megamoe.variants.base import Study

TOLERANCE = 0.05
BASELINE = "switch"
"""Switch top-1 with the same router (the top-k study's run)."""


def claims(v: dict) -> list[tuple[str, bool, str]]:
    if "mpo" not in v or BASELINE not in v:
        return []
    m, s = mean_ppl(v["mpo"]), mean_ppl(v[BASELINE])
    ratio = v[BASELINE][0].moe_layer_params / v["mpo"][0].moe_layer_params
    return [(f"MPOE within {100 * TOLERANCE:.0f} % of Switch at a fraction of the parameters",
             m <= s * (1 + TOLERANCE) and ratio > 1,
             f"MPOE {m:.1f} vs Switch {s:.1f}; Switch's MoE layers hold {ratio:.1f}x MPOE's parameters")]


STUDY = Study(runs={"mpo": ["moe.variant=mpo", "moe.num_experts=8"]}, claims=claims,
              gaps=(("mpo", BASELINE, TOLERANCE),))
