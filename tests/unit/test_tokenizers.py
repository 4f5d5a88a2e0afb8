"""Both tokenizer kinds (Megatron-LM's SentencePieceTokenizer and HuggingFaceTokenizer): trained lossless on the
multi-line sample corpus, loaded from a file or a directory, refused in one line when broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megamoe.data.corpus import read_documents
from megamoe.data.preprocess import encode_corpus, train_tokenizer
from megamoe.data.tokenizer import HuggingFaceTokenizer, load_tokenizer, mask_id, tokenizer_problem, vocab_size
from tests.helpers import ROOT

KINDS = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
HOSTILE = ("def f(x):\n\tif x:\n        return  x  # two spaces\n\n\n    pass\r\n"
           "Ελληνικά, русский, 日本語, العربية, हिन्दी — emoji 😀👍🏽, NBSP\u00a0and\u2003em space, trailing   \n"
           " leading space, <mask> literal, </s> literal, \x07 bell")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: train_tokenizer([tiny_data["corpus"]], str(root / kind), vocab_size=600, tokenizer_type=kind)
            for kind in KINDS}


def _texts(tiny_data) -> list[str]:
    sources = sorted((ROOT / "megamoe").rglob("*.py"))[:40]
    return [*read_documents(ROOT / "data" / "shakespeare-train.jsonl.gz"), HOSTILE,
            *(path.read_text(encoding="utf-8") for path in sources)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_trained_tokenizer_is_lossless(tiny_data, trained, kind):
    """decode(encode(text)) == text for every document of the sample corpus (multi-line verse), this project's own
    sources (indentation, tabs) and a text of scripts, emoji and odd whitespace."""
    tokenizer = load_tokenizer(trained[kind], kind)
    texts = _texts(tiny_data)
    assert sum("\n" in t for t in texts) > 1000  # the corpus's documents are multi-line
    lost = [t[:80] for t in texts if tokenizer.detokenize(tokenizer.tokenize(t)) != t]
    assert not lost, f"{len(lost)} of {len(texts)} texts change through encode + decode, e.g. {lost[0]!r}"
    assert tokenizer.eod == 3


def test_normalize_keeps_the_older_lossy_sentencepiece_model(tiny_data, tmp_path):
    model = train_tokenizer([tiny_data["corpus"]], str(tmp_path / "norm"), vocab_size=600, normalize=True)
    tokenizer = load_tokenizer(model)
    text = "two\nlines  and   spaces"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == "two lines and spaces"


def test_a_lossless_sentencepiece_model_needs_byte_fallback(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="needs byte fallback"):
        train_tokenizer([tiny_data["corpus"]], str(tmp_path / "x"), vocab_size=600, byte_fallback=False)
    assert not list(tmp_path.iterdir()), "nothing is written"


def test_a_hugging_face_tokenizer_has_megamoe_special_ids(trained, tmp_path):
    path = trained["HuggingFaceTokenizer"]
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes(Path(path).read_bytes())
    for where in (path, directory):
        tokenizer = HuggingFaceTokenizer(where)
        assert (tokenizer.pad, tokenizer.eod, tokenizer.mask) == (0, 3, 4)
        assert tokenizer.vocab_size == vocab_size(where, "HuggingFaceTokenizer") == 600
        assert mask_id(where, "HuggingFaceTokenizer") == 4
        assert tokenizer.tokenize("hello")[0] > 4
        # a special token's text in a document is text (as with sentencepiece): never the id itself
        assert 4 not in tokenizer.tokenize("<mask>") and 3 not in tokenizer.tokenize("a </s> b")
        assert tokenizer.detokenize(tokenizer.tokenize("a </s> b")) == "a </s> b"


def test_a_broken_hugging_face_tokenizer_is_one_line(trained, tmp_path):
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text(Path(trained["HuggingFaceTokenizer"]).read_text()[:500])
    no_eod = json.loads(Path(trained["HuggingFaceTokenizer"]).read_text())
    no_eod["added_tokens"] = [t for t in no_eod["added_tokens"] if t["content"] != "</s>"]
    del no_eod["model"]["vocab"]["</s>"]
    (tmp_path / "no_eod.json").write_text(json.dumps(no_eod))
    cases = {str(corrupt): "is not a Hugging Face tokenizer.json",
             str(tmp_path / "missing.json"): "does not exist",
             str(tmp_path): "is not a Hugging Face tokenizer.json",  # a directory whose tokenizer.json is corrupt
             str(tmp_path / "no_eod.json"): "has no end-of-document token",
             trained["SentencePieceTokenizer"]: "is not a Hugging Face tokenizer.json"}
    for path, message in cases.items():
        problem = tokenizer_problem(path, "HuggingFaceTokenizer")
        assert problem is not None and message in problem and "\n" not in problem, (path, problem)
    assert "is not a sentencepiece model" in tokenizer_problem(trained["HuggingFaceTokenizer"],
                                                               "SentencePieceTokenizer")


@pytest.mark.parametrize("kind", KINDS)
def test_the_dataset_records_the_tokenizer_kind(tiny_data, trained, kind, tmp_path):
    from megamoe.data.checks import DataFileError, check_indexed_dataset

    prefix = encode_corpus([tiny_data["corpus"]], trained[kind], str(tmp_path / "d"), tokenizer_type=kind).prefix
    meta = json.loads(Path(prefix + ".meta.json").read_text())
    assert meta["tokenizer_type"] == kind and meta["vocab_size"] == 600
    check_indexed_dataset(prefix, trained[kind], 600, kind)
    other = next(k for k in KINDS if k != kind)
    with pytest.raises(DataFileError, match="was tokenized with"):
        check_indexed_dataset(prefix, trained[other], 600, other)


def test_the_tool_trains_either_kind_and_training_reads_it(tiny_data, tmp_path):
    """tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer, then a few training steps on its dataset
    through the normal config path (start-up checks included)."""
    import math
    import subprocess
    import sys

    from tests.helpers import spawn

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", tiny_data["corpus"],
                           "--output-prefix", str(out), "--train-tokenizer", "--vocab-size", "600",
                           "--tokenizer-type", "HuggingFaceTokenizer"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "byte-level BPE" in proc.stdout and (tmp_path / "hf.tokenizer.json").is_file()
    data = {**tiny_data, "tokenizer": str(tmp_path / "hf.tokenizer.json"), "prefix": f"{out}_text_document"}
    losses = spawn(_losses, 1, data, ["data.tokenizer_type=HuggingFaceTokenizer"], 2)[0]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", tiny_data["corpus"],
                          "--output-prefix", str(tmp_path / "x"), "--tokenizer-model", str(tmp_path / "nothing"),
                          "--tokenizer-type", "HuggingFaceTokenizer"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--tokenizer-model" in bad.stderr and "does not exist" in bad.stderr
    assert not list(tmp_path.glob("x*")), "nothing is written"


def _losses(data: dict, overrides: list[str], steps: int) -> list[float]:
    from tests.helpers import train_steps

    return train_steps(data, overrides, steps)["losses"]


def test_sentencepieces_own_space_symbol_is_the_one_loss_and_is_reported(trained, tmp_path):
    """U+2581 is how sentencepiece writes a space: in a text it decodes as a space. The byte-level BPE keeps it;
    encoding a corpus with sentencepiece counts the documents that hold it."""
    text = 'SPIECE_UNDERLINE = "\u2581"  # sentencepiece\'s space'
    sentencepiece = load_tokenizer(trained["SentencePieceTokenizer"])
    assert sentencepiece.detokenize(sentencepiece.tokenize(text)) == text.replace("\u2581", " ")
    bpe = load_tokenizer(trained["HuggingFaceTokenizer"], "HuggingFaceTokenizer")
    assert bpe.detokenize(bpe.tokenize(text)) == text
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in (text, "plain", text + "\nagain")))
    counts = {kind: encode_corpus([str(corpus)], trained[kind], str(tmp_path / kind), tokenizer_type=kind
                                  ).meta_symbol_documents for kind in KINDS}
    assert counts == {"SentencePieceTokenizer": 2, "HuggingFaceTokenizer": 0}
