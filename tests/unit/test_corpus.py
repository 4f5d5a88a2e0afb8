"""Corpora as users bring them, through tools/preprocess_data.py with Megatron-LM's options: a directory of source
files (include patterns, size limit, duplicates, files that are not text), several --json-keys (one dataset per
key), --no-append-eod, several workers; bad inputs are one line and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megamoe.data.corpus import Corpus, ReadStats
from megamoe.data.tokenizer import load_tokenizer
from tests.helpers import load_tool

CODE = {  # relative path -> bytes: what a small code base holds
    "pkg/__init__.py": b'"""A package."""\n',
    "pkg/core.py": b"def f(x):\n\tif x:\n        return  x\r\n\n\n# \xce\xb1\xce\xb2\n",
    "pkg/sub/copy_of_core.py": b"def f(x):\n\tif x:\n        return  x\r\n\n\n# \xce\xb1\xce\xb2\n",  # duplicate
    "pkg/sub/util.py": b"import os\n\nPATH = os.sep\n",
    "pkg/big_table.py": b"TABLE = [" + b"0, " * 400 + b"]\n",  # over the size limit
    "pkg/latin1.py": b"# caf\xe9\n",  # not UTF-8
    "pkg/blob.py": b"x = 1\0\0\0",  # binary
    "pkg/empty.py": b"\n",
    "pkg/.hidden/secret.py": b"SECRET = 1\n",  # hidden: left out
    "README.md": b"# Project\n\nSome prose.\n",  # not matched by *.py
}


def _write_tree(root: Path) -> Path:
    for relative, data in CODE.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def _documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_links_fifos_and_duplicates_across_directories_are_skipped_not_fatal(tmp_path):
    import os

    first, second = _write_tree(tmp_path / "a"), tmp_path / "b"
    second.mkdir()
    (second / "again.py").write_bytes(CODE["pkg/sub/util.py"])  # the same bytes as a file of the first directory
    (second / "broken.py").symlink_to(tmp_path / "nowhere.py")
    os.mkfifo(second / "pipe.py")  # reading it would block forever
    stats = ReadStats()
    texts = [r["text"] for r in Corpus((str(first), str(second)), include=("*.py",)).records(stats)]
    assert len(texts) == 4 and stats.skipped_files["duplicate"] == 2  # copy_of_core.py, b/again.py
    assert stats.skipped_files["not a regular file"] == 2


def test_a_directory_is_read_file_by_file_byte_for_byte_with_skips_counted(tmp_path):
    corpus = Corpus((str(_write_tree(tmp_path / "src")),), include=("*.py",), max_file_bytes=1000)
    stats = ReadStats()
    texts = [record["text"] for record in corpus.records(stats)]
    want = ["pkg/__init__.py", "pkg/core.py", "pkg/sub/util.py"]  # sorted walk order
    assert texts == [CODE[path].decode() for path in want]  # CRLF, tabs, runs of spaces and UTF-8 kept
    assert stats.files_kept == 3
    assert dict(stats.skipped_files) == {"duplicate": 1, "too large": 1, "not UTF-8": 1, "binary": 1, "empty": 1}
    assert stats.first_skipped_file["duplicate"].endswith("pkg/sub/copy_of_core.py")
    subset = Corpus((str(tmp_path / "src"),), include=("*.md", "pkg/sub/*"))  # core.py unread: no duplicate
    assert [r["text"] for r in subset.records(ReadStats())] == [
        CODE[p].decode() for p in ("README.md", "pkg/sub/copy_of_core.py", "pkg/sub/util.py")]


@pytest.mark.parametrize("workers", [1, 2])
def test_the_tool_turns_a_code_base_into_a_dataset(tiny_data, tmp_path, capsys, workers):
    source = _write_tree(tmp_path / "src")
    out = tmp_path / "code"
    assert load_tool("preprocess_data").main([
        "--input", str(source), "--include", "*.py", "--max-file-bytes", "1000", "--output-prefix", str(out),
        "--train-tokenizer", "--vocab-size", "300", "--tokenizer-type", "HuggingFaceTokenizer",
        "--workers", str(workers)]) == 0
    printed = capsys.readouterr().out
    assert "3 documents" in printed and "files: 3 kept, 5 skipped: 1 binary" in printed, printed
    tokenizer = load_tokenizer(f"{out}.tokenizer.json", "HuggingFaceTokenizer")
    documents = _documents(f"{out}_text_document")
    assert all(ids[-1] == tokenizer.eod for ids in documents)
    assert [tokenizer.detokenize(ids[:-1]) for ids in documents] == [
        CODE[p].decode() for p in ("pkg/__init__.py", "pkg/core.py", "pkg/sub/util.py")]
    sidecar = json.loads(Path(f"{out}_text_document.meta.json").read_text())
    assert sidecar["skipped_files"]["duplicate"] == 1 and sidecar["append_eod"] is True


def test_several_json_keys_give_one_dataset_each_and_eod_is_optional(tiny_data, tmp_path, capsys):
    records = [{"title": f"Title {i}", "text": f"Body {i}\n\tindented line {i}", "id": i} for i in range(5)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "docs"
    assert load_tool("preprocess_data").main([
        "--input", str(source), "--json-keys", "title", "text", "--output-prefix", str(out),
        "--tokenizer-model", tiny_data["tokenizer"], "--no-append-eod"]) == 0
    assert "docs_title_document.bin/.idx, " in capsys.readouterr().out
    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    for key in ("title", "text"):  # Megatron-LM's naming: <prefix>_<key>_document
        documents = _documents(f"{out}_{key}_document")
        assert [tokenizer.detokenize(ids) for ids in documents] == [r[key] for r in records]
        assert all(ids[-1] != tokenizer.eod for ids in documents)


@pytest.mark.parametrize("case", ["no matching file", "two keys for a directory", "missing key",
                                  "tokenizer model missing", "plain text with two keys"])
def test_bad_corpus_inputs_are_one_line_and_write_nothing(tiny_data, tmp_path, capsys, case):
    source = _write_tree(tmp_path / "src")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "a body"}) + "\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("one document\nanother\n")
    out = str(tmp_path / "out" / "x")
    tokenizer = ["--tokenizer-model", tiny_data["tokenizer"]]
    argv, expected = {
        "no matching file": ([str(source), "--include", "*.rs", *tokenizer],
                             f"--input '{source}' holds no file matching --include *.rs (hidden entries left out)"),
        "two keys for a directory": ([str(source), "--json-keys", "a", "b", *tokenizer],
                                     f"--input '{source}' is a directory: its files are documents of one dataset"),
        "missing key": ([str(jsonl), "--json-keys", "text", "title", *tokenizer], f"{jsonl}:1 has no 'title' field"),
        "tokenizer model missing": ([str(jsonl), "--tokenizer-model", str(tmp_path / "nothing.model")],
                                    "--tokenizer-model '" + str(tmp_path / "nothing.model") + "' does not exist"),
        "plain text with two keys": ([str(plain), "--json-keys", "a", "b", *tokenizer],
                                     f"--input '{plain}' is plain text (one document per line): --json-keys a b "
                                     "selects fields of .jsonl files"),
    }[case]
    code = None
    try:
        code = load_tool("preprocess_data").main(["--input", *argv, "--output-prefix", out])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()  # argparse's usage, then the error in one line
    assert code == 2 and expected in err[-1], err
    assert err[-1].startswith("megamoe: preprocess_data: ") or ": error: " in err[-1], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
