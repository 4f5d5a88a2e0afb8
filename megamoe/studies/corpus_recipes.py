"""Named corpora of several domains for the studies (tools/build_corpus.py --recipe NAME)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megamoe.data.corpus import Corpus
from megamoe.data.domains import Domain, source_directory_of_environment

SAMPLE_CORPUS = Path(__file__).resolve().parents[2] / "data" / "shakespeare-train.jsonl.gz"


def code_prose() -> list[Domain]:
    """Code: the Python sources of this environment's installed packages (torch, transformers, DeepSpeed,
    megatron-core, numpy, ...: thousands of authors); prose: the sample corpus (Shakespeare's plays)."""
    return [Domain("code", Corpus((source_directory_of_environment(),), include=("*.py",))),
            Domain("prose", Corpus((str(SAMPLE_CORPUS),)))]


RECIPES: dict[str, Callable[[], list[Domain]]] = {"code-prose": code_prose}
