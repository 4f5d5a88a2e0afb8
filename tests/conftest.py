"""Session fixtures: a tiny tokenizer + indexed dataset from the bundled corpus; hermetic environment."""

from __future__ import annotations

import gzip
import itertools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")

CORPUS = ROOT / "data" / "shakespeare-train.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """The first 300 documents of the sample corpus, a 512-piece BPE tokenizer, one indexed dataset."""
    from megamoe.data import preprocess

    root = tmp_path_factory.mktemp("data")
    corpus = root / "slice.jsonl"
    with gzip.open(CORPUS, "rt") as src, corpus.open("w") as dst:
        dst.writelines(itertools.islice(src, 300))
    tokenizer = preprocess.train_tokenizer([str(corpus)], str(root / "spm"), vocab_size=512)
    prefix = preprocess.encode_corpus([str(corpus)], tokenizer, str(root / "slice")).prefix
    return {"root": str(root), "corpus": str(corpus), "tokenizer": tokenizer, "prefix": prefix}
