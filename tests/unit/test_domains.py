"""tools/build_corpus.py: a corpus of several domains, duplicates removed across them, a held-out split per domain
by document, the tokenizer trained on the training splits alone, every document back byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megamoe.data import domains, preprocess
from megamoe.data.corpus import Corpus
from megamoe.data.tokenizer import load_tokenizer
from tests.helpers import load_tool

SHARE = 0.3


def _code_tree(root: Path) -> dict[str, str]:
    """A small code base: 30 distinct modules, one copied under another name, one binary file."""
    files = {f"pkg/mod{i:02d}.py": f"def f{i}(x):\n\tif x > {i}:\n        return  x * {i}\r\n\n# \u03b1\u03b2 {i}\n"
             for i in range(30)}
    files["pkg/sub/copy_of_mod03.py"] = files["pkg/mod03.py"]
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text, newline="")
    (root / "pkg" / "blob.py").write_bytes(b"x = 1\0\0")
    return files


def _prose(path: Path, code_file: str) -> list[str]:
    """40 passages of prose, the last also one of the code files (a cross-domain duplicate)."""
    lines = [f"Passage {i}.\nTo be, or not to be: {'that ' * (i % 5)}is the question {i}.\n" for i in range(39)]
    lines.append(code_file)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return lines


def _documents(prefix: str, tokenizer) -> list[str]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [tokenizer.detokenize([int(i) for i in dataset[d][:-1]]) for d in range(len(dataset))]  # EOD dropped


@pytest.fixture
def built(tmp_path, monkeypatch):
    code = _code_tree(tmp_path / "src")
    prose = _prose(tmp_path / "prose.jsonl", code["pkg/mod07.py"])
    fitted_on: list[str] = []
    train = preprocess.train_tokenizer

    def spy(inputs, *args, **kwargs):  # what the tokenizer is fitted on
        fitted_on.extend(Corpus.of(inputs).texts(preprocess.ReadStats()))
        return train(inputs, *args, **kwargs)

    monkeypatch.setattr(preprocess, "train_tokenizer", spy)
    chosen = [domains.Domain("code", Corpus((str(tmp_path / "src"),), include=("*.py",))),
              domains.Domain("prose", Corpus((str(tmp_path / "prose.jsonl"),)))]
    manifest = domains.build(chosen, tmp_path / "out", held_out=SHARE, vocab_size=400)
    return {"manifest": manifest, "code": code, "prose": prose, "fitted_on": fitted_on, "out": tmp_path / "out"}


def test_domains_are_split_by_document_and_come_back_byte_for_byte(built):
    manifest, tokenizer = built["manifest"], None
    tokenizer = load_tokenizer(manifest["tokenizer_model"], manifest["tokenizer_type"])
    unique_code = list(dict.fromkeys(built["code"].values()))  # the copy left out (the first read is kept)
    unique_prose = built["prose"][:-1]  # the passage that is also a code file left out
    for name, texts in (("code", unique_code), ("prose", unique_prose)):
        splits = manifest["domains"][name]["splits"]
        held = [t for t in texts if domains.held_out_by_hash(t, SHARE)]
        assert 0 < len(held) < len(texts), (name, len(held))  # both splits populated at this share
        got_train = _documents(splits["train"]["prefix"], tokenizer)
        got_held = _documents(splits["held_out"]["prefix"], tokenizer)
        assert sorted(got_held) == sorted(held) and sorted(got_train) == sorted(set(texts) - set(held)), name
        assert splits["held_out"]["documents"] == len(held)
        assert splits["train"]["bytes"] == sum(len(t.encode()) for t in set(texts) - set(held))
        assert splits["train"]["tokens"] == sum(len(tokenizer.tokenize(t)) + 1 for t in got_train)
    assert manifest["domains"]["code"]["duplicates"] == 1 and manifest["domains"]["prose"]["duplicates"] == 1
    assert manifest["domains"]["code"]["skipped_files"] == {"duplicate": 1, "binary": 1}
    assert json.loads((built["out"] / domains.MANIFEST).read_text()) == manifest


def test_tokenizer_is_fitted_on_the_training_splits_only(built):
    fitted, manifest = set(built["fitted_on"]), built["manifest"]
    tokenizer = load_tokenizer(manifest["tokenizer_model"], manifest["tokenizer_type"])
    for domain in manifest["domains"].values():
        assert not fitted & set(_documents(domain["splits"]["held_out"]["prefix"], tokenizer))
        assert set(_documents(domain["splits"]["train"]["prefix"], tokenizer)) <= fitted


def test_split_of_a_document_does_not_depend_on_the_rest_of_the_corpus():
    texts = [f"document {i}\n" for i in range(2000)]
    held = [domains.held_out_by_hash(t, 0.05) for t in texts]
    assert held == [domains.held_out_by_hash(t, 0.05) for t in texts]  # a pure function of the text
    assert 60 <= sum(held) <= 140  # about 5 % of 2,000


def test_build_corpus_tool_prints_statistics_and_refuses_bad_input(tmp_path, capsys):
    tool = load_tool("build_corpus")
    code = _code_tree(tmp_path / "src")
    _prose(tmp_path / "prose.jsonl", code["pkg/mod07.py"])
    args = ["--domain", f"code={tmp_path / 'src'}", "--domain", f"prose={tmp_path / 'prose.jsonl'}",
            "--include", "*.py", "--held-out", "0.3", "--vocab-size", "400", "--workers", "1"]
    assert tool.main([*args, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| code | held_out |" in printed and "| prose | train |" in printed and "1 exact duplicates" in printed
    with pytest.raises(SystemExit):  # the corpus is there already: never overwritten
        tool.main([*args, "--out", str(tmp_path / "out")])
    assert "already holds a corpus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--domain", f"code={tmp_path / 'missing'}", "--out", str(tmp_path / "other")])
    assert "domain 'code': --input" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert tool.main([*args[:4], "--held-out", "0.0001", "--vocab-size", "400", "--out", str(tmp_path / "o2")]) == 2
    assert "has no held_out document" in capsys.readouterr().err and not (tmp_path / "o2").exists()
