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


def _curve_run(variant: str, seed: int, losses: list[float]) -> RunResult:
    import dataclasses
    import math

    steps = range(0, 100 * len(losses), 100)
    return dataclasses.replace(_run(variant, seed, math.exp(losses[-1])), curve=list(zip(steps, losses, strict=True)),
                               tokens=100 * (len(losses) - 1) * 1000)


def test_a_gap_closing_along_the_run_is_extrapolated_to_the_budget_where_the_line_reaches_the_claim():
    """Gap against log(tokens) over the second half: halving every doubling of the tokens reaches 0 % where the
    straight line says; a widening gap is said not to close; a held claim says how its gap moves, and where a
    shrinking margin would run out."""
    import math

    from megamoe.studies.compare_report import gap_points, gap_verdict

    dense = [_curve_run("dense", 1, [5.0] * 9)]
    # The run's perplexity is dense's x (1 + g) with g falling by 2 points per doubling of steps from step 200.
    gaps = {step: 0.12 - 0.02 * math.log2(step / 200) for step in range(100, 900, 100)}
    switch = [_curve_run("switch", 1, [5.0] + [5.0 + math.log(1 + gaps[s]) for s in range(100, 900, 100)])]
    points = gap_points(switch, dense)
    assert [s for s, _ in points] == list(range(100, 900, 100))
    assert all(abs(g - 100 * gaps[s]) < 1e-9 for s, g in points)
    verdict = gap_verdict(points, 1000.0, 0.0)
    # The fit over steps 400..800 is exact: 0 % at step 200 * 2**6 = 12,800, 16x the 800 steps run.
    assert verdict.startswith("does not hold yet; closing (-2.0 points per doubling")
    assert "about 13 M tokens, 16.0x this budget" in verdict
    widening = [(s, 10.0 + s / 100) for s in range(100, 900, 100)]
    assert gap_verdict(widening, 1000.0, 0.0).startswith("does not hold, and the gap does not close (+")
    assert gap_verdict([(s, -3.0) for s in range(100, 900, 100)], 1000.0, 0.0).startswith("holds at the end (+0.0")
    assert gap_verdict(points, 1000.0, 10.0).startswith("holds at the end (-2.0")  # 8 % at the end: within 10 %
    # The mirror image: -8 % at the end, rising by 2 points per doubling: it would stop holding at step 12,800.
    shrinking = [(s, -g) for s, g in points]
    assert gap_verdict(shrinking, 1000.0, 0.0) == (
        "holds at the end, with a shrinking margin (+2.0 points per doubling of tokens over the second half): the "
        "line reaches +0 % at about 13 M tokens, 16.0x this budget")


def test_the_recorded_commit_is_marked_uncommitted_for_changed_code_not_for_the_studys_own_outputs(tmp_path):
    import subprocess

    from megamoe.studies.compare import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "report.md").write_text("committed report")
    (tmp_path / "code.py").write_text("x = 1")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    outputs = (tmp_path / "docs" / "results", tmp_path / "runs")
    clean = git_commit(tmp_path, outputs)
    assert len(clean) == 40 and not clean.endswith("+uncommitted")
    (tmp_path / "docs" / "results" / "report.md").write_text("rewritten after a run")
    (tmp_path / "run_study.sh").write_text("untracked")
    assert git_commit(tmp_path, outputs) == clean
    (tmp_path / "code.py").write_text("x = 2")
    assert git_commit(tmp_path, outputs) == clean + "+uncommitted"
