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


def test_loss_curves_show_every_seed_with_causal_and_masked_lm_apart(tmp_path):
    """Mean and min-max band over seeds, at the steps every seed evaluated; masked-LM runs on a panel of their own."""
    import dataclasses

    from matplotlib.image import imread

    from megamoe.studies.compare_report import _plots, objective_of, seed_band

    def with_curve(run: RunResult, losses: list[float], overrides: tuple[str, ...] = ()) -> RunResult:
        return dataclasses.replace(run, curve=list(zip((0, 10, 20), losses, strict=True)), overrides=[*overrides])

    dense = [with_curve(_run("dense", 1, 9.0), [6.0, 5.0, 4.0]), with_curve(_run("dense", 2, 9.0), [6.2, 5.4, 4.2])]
    steps, mean, low, high = seed_band(dense)
    assert steps == [0, 10, 20] and mean == [6.1, 5.2, 4.1] and low == [6.0, 5.0, 4.0] and high == [6.2, 5.4, 4.2]
    encoder = with_curve(_run("encoder", 1, 9.0), [3.0, 2.0, 1.0], ("model.objective=masked_lm",))
    assert [objective_of(r) for r in (dense[0], encoder)] == ["causal LM", "masked LM"]
    _plots([*dense, encoder], tmp_path)
    height, width = imread(tmp_path / "loss_curves.png").shape[:2]
    assert width > 1.8 * height  # two panels side by side
