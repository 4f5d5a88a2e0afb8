"""The comparison on a corpus of two domains (compare_variants --recipe): perplexity per domain, the trend along
the run, the routers' split of the domains, and runs kept beside the report so a second call trains nothing."""

from __future__ import annotations

import gzip
import itertools
import math
from pathlib import Path

import pytest

from megamoe.studies.compare_report import domain_information, domain_share
from tests.helpers import ROOT, spawn

RUNS = ["dense", "top2", "fine_grained_shared", "cartesian", "peer"]


def _study(root: str, train: bool) -> dict:
    from megamoe.data import domains
    from megamoe.data.corpus import Corpus
    from megamoe.studies import compare, compare_report, corpus_recipes

    root = Path(root)
    if train:  # this checkout's own sources as code, 300 documents of the sample corpus as prose
        prose = root / "prose.jsonl"
        with gzip.open(corpus_recipes.SAMPLE_CORPUS, "rt") as src:
            prose.write_text("".join(itertools.islice(src, 300)))
        domains.build([domains.Domain("code", Corpus((str(ROOT / "megamoe"),), include=("*.py",))),
                       domains.Domain("prose", Corpus((str(prose),)))], root / "data", held_out=0.2, vocab_size=600)
    data = compare.prepare_recipe("code-prose", root / "data", vocab_size=600)
    trained = []
    results = compare.run_comparison(data, root / "work", [1], compare.QUICK, RUNS, quick=True, commit="abc",
                                     keep_dir=root / "out", on_result=lambda done: trained.append(len(done)))
    meta = {"commit": "abc", "tokens_per_run": compare.QUICK.tokens, "budget": compare.QUICK.__dict__,
            "corpus_statistics": data.corpus, "command": "python tools/compare_variants.py --recipe code-prose"}
    compare_report.write_outputs(results, meta, root / "out")
    return {"results": [r.__dict__ for r in results], "trained": trained, "data": data.overrides()}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    first = spawn(_study, 1, str(root), True, timeout=600)[0]
    return {"root": root, "first": first}


def test_each_domain_is_evaluated_on_its_own_held_out_set(study):
    root, first = study["root"], study["first"]
    assert any("data.valid_data_path=[" in o and "code_held_out" in o for o in first["data"])
    for run in first["results"]:
        assert set(run["set_ppl"]) == {"code_held_out", "prose_held_out"}, run["variant"]
        pooled = math.log(run["valid_ppl"])
        losses = [math.log(p) for p in run["set_ppl"].values()]
        assert min(losses) - 1e-6 <= pooled <= max(losses) + 1e-6  # equal tokens per set: the mean of the two
        assert set(run["set_curves"]) == set(run["set_ppl"]) and len(run["set_curves"]["code_held_out"]) >= 2
    routed = {r["variant"]: r["expert_load"] for r in first["results"]}
    assert set(routed["top2"]["code_held_out"]) == {"layer1", "layer2"}
    assert set(routed["cartesian"]["prose_held_out"]) == {"layer1a", "layer1b", "layer2a", "layer2b"}
    report = (root / "out" / "report.md").read_text()
    assert "| code | held_out |" in report and "code ppl | prose ppl |" in report
    assert "Trend: held-out perplexity" in report and "| peer | all " in report
    assert "Gaps along the run" in report and "| peer vs dense | 0 % |" in report
    assert "| cartesian | layer2b |" in report and "MoE: top-2 below dense" in report
    assert (root / "out" / "specialisation.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_call_trains_nothing_and_gives_the_same_results(study):
    root, first = study["root"], study["first"]
    kept = sorted(p.name for p in (root / "out" / "runs").iterdir())
    assert kept == sorted(f"{r}-seed1.json" for r in RUNS)
    again = spawn(_study, 1, str(root), False, timeout=600)[0]
    assert again["results"] == first["results"]
    # Only the kept results (no log directories): another checkout with the report alone trains nothing either.
    for run in (root / "work" / "runs").iterdir():
        (run / "result.json").unlink()
    assert spawn(_study, 1, str(root), False, timeout=600)[0]["results"] == again["results"]


def test_mutual_information_of_expert_and_domain():
    alike = {"code": [0.25, 0.25, 0.5], "prose": [0.25, 0.25, 0.5]}
    apart = {"code": [0.5, 0.5, 0.0, 0.0], "prose": [0.0, 0.0, 0.5, 0.5]}
    assert domain_information(alike) == pytest.approx(0.0, abs=1e-12)
    assert domain_information(apart) == pytest.approx(1.0)
    half = {"code": [1.0, 0.0], "prose": [0.5, 0.5]}  # p(e) = (0.75, 0.25)
    expected = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert domain_information(half) == pytest.approx(expected)
    assert domain_share(half, "code") == pytest.approx([2 / 3, 0.0])
    assert math.isnan(domain_share({"code": [0.0, 1.0], "prose": [0.0, 1.0]}, "code")[0])


def test_a_kept_run_of_another_corpus_is_not_reused(study, tmp_path):
    """A corpus rebuilt from other installed packages has other statistics: its runs train again."""
    import json

    from megamoe.studies import compare

    kept = json.loads((study["root"] / "out" / "runs" / "dense-seed1.json").read_text())
    key = {"settings": kept["settings"], "data": kept["data"]}
    (tmp_path / "same.json").write_text(json.dumps(kept))
    assert compare._saved_result(tmp_path / "same.json", key) is not None
    other = json.loads(json.dumps(kept))
    other["data"]["code"]["train"][2] += 1  # one token more
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert compare._saved_result(tmp_path / "other.json", key) is None
