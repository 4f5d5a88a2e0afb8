"""The comparison's verdicts on the papers' claims: judged on the means and on every seed alone."""

from __future__ import annotations

from megamoe.studies.compare import RunResult
from megamoe.studies.compare_report import claims


def _run(variant: str, seed: int, ppl: float) -> RunResult:
    return RunResult(variant=variant, seed=seed, overrides=[], valid_ppl=ppl, valid_loss=0.0, params_total=1,
                     moe_layer_params=1, active_ffn_madds=1, seconds=1.0)


def _verdict(peer: dict[int, float], dense: dict[int, float]) -> str:
    runs = [_run("peer", s, p) for s, p in peer.items()] + [_run("dense", s, p) for s, p in dense.items()]
    (claim, verdict, numbers), = claims(runs)
    assert claim == "PEER below dense at equal active FLOPs" and numbers.startswith("PEER ")
    return verdict


def test_a_claim_holding_on_every_seed_is_yes_and_on_none_is_no():
    assert _verdict({1: 190.0, 2: 195.0}, {1: 200.0, 2: 205.0}) == "yes"
    assert _verdict({1: 210.0, 2: 215.0}, {1: 200.0, 2: 205.0}) == "no"


def test_seeds_that_disagree_make_the_verdict_mixed_naming_them():
    verdict = _verdict({1: 190.0, 2: 230.0}, {1: 200.0, 2: 205.0})  # mean 210 > 202.5, but seed 1 holds
    assert verdict == "mixed: no on the means, holds for seed(s) [1] of [1, 2]"
    assert _verdict({1: 190.0}, {1: 200.0}) == "yes"
