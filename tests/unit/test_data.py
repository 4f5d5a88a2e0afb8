"""Preprocessing into Megatron indexed datasets, and the data-parallel sample order."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from megamoe.data.corpus import read_documents
from megamoe.data.loader import MicroBatchSampler
from megamoe.data.preprocess import encode_corpus
from megamoe.data.tokenizer import load_tokenizer, spm_vocab_size
from tests.helpers import ROOT


def test_indexed_dataset_round_trip(tiny_data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    docs = list(read_documents(tiny_data["corpus"]))
    dataset = IndexedDataset(tiny_data["prefix"])
    assert len(dataset) == len(docs) == 300
    for i, doc in enumerate(docs):  # token for token, every document
        assert np.array_equal(dataset[i], np.array(tokenizer.tokenize(doc) + [tokenizer.eod])), f"document {i}"
    assert dataset.index.dtype == np.uint16 and spm_vocab_size(tiny_data["tokenizer"]) == 512


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "hello"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    assert list(read_documents(tmp_path / "a.txt")) == ["first doc", "second doc"]
    docs = read_documents(tmp_path / "b.jsonl.gz")
    assert next(docs) == "hello"
    with pytest.raises(ValueError, match=r"b.jsonl.gz:2 has no 'text' field"):
        next(docs)


def test_windows_line_ends_are_not_part_of_a_document(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"first doc\r\nsecond doc\r\n")
    assert list(read_documents(tmp_path / "crlf.txt")) == ["first doc", "second doc"]


def test_encode_names_files_like_megatron(tiny_data, tmp_path):
    report = encode_corpus([tiny_data["corpus"]], tiny_data["tokenizer"], str(tmp_path / "c"))
    prefix, docs, tokens = report.prefix, report.documents, report.tokens
    assert prefix.endswith("c_text_document") and docs == 300 and tokens > 300
    assert (tmp_path / "c_text_document.bin").stat().st_size == 2 * tokens  # uint16


def _indices(sampler: MicroBatchSampler) -> list[list[int]]:
    return list(iter(sampler))


def test_dp2_sees_what_dp1_sees_with_a_doubled_micro_batch():
    single = _indices(MicroBatchSampler(40, 0, 4, dp_rank=0, dp_size=1))
    rank0 = _indices(MicroBatchSampler(40, 0, 2, dp_rank=0, dp_size=2))
    rank1 = _indices(MicroBatchSampler(40, 0, 2, dp_rank=1, dp_size=2))
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == single
    assert len(single) == len(rank0) == 10


def test_sampler_resumes_after_consumed_samples():
    assert _indices(MicroBatchSampler(20, 12, 2, dp_rank=1, dp_size=2)) == [[14, 15], [18, 19]]
    assert len(MicroBatchSampler(20, 12, 2, dp_rank=1, dp_size=2)) == 2


def _blend_fractions(data: dict, second_prefix: str) -> dict:
    import numpy as np

    from megamoe.data.loader import build_datasets
    from megamoe.data.tokenizer import load_tokenizer
    from megamoe.parallel.initialize import initialize
    from megamoe.train import startup
    from tests.helpers import tiny_config

    cfg = tiny_config(data, f"data.data_path=[0.7, {data['prefix']}, 0.3, {second_prefix}]", "train.train_iters=50",
                      "train.eval_iters=2")
    layout = startup.check(cfg)
    initialize(cfg.parallel, cfg.train.seed)  # blends cache their indices: megatron wants a process group
    datasets = build_datasets(cfg, layout, load_tokenizer(data["tokenizer"]))
    sample = datasets.train[0]
    return {"fractions": np.bincount(datasets.train.dataset_index, minlength=2) / len(datasets.train),
            "train": len(datasets.train), "valid": len(datasets.valid["valid"]), "keys": sorted(sample),
            "shifted": bool((sample["tokens"][1:] == sample["labels"][:-1]).all())}


def test_weighted_blend_through_megatron_builder(tiny_data, tmp_path):
    from tests.helpers import spawn

    second = encode_corpus([tiny_data["corpus"]], tiny_data["tokenizer"], str(tmp_path / "second")).prefix
    got = spawn(_blend_fractions, 1, tiny_data, second)[0]
    assert got["fractions"].round(2).tolist() == [0.7, 0.3]
    assert got["train"] == 50 * 4 and got["valid"] >= 2 * 4  # train_iters x global batch; eval_iters x micro
    assert got["keys"] == ["dataset_id", "labels", "loss_mask", "position_ids", "tokens"] and got["shifted"]


def test_two_workers_write_the_same_files_in_order(tiny_data, tmp_path):
    one = encode_corpus([tiny_data["corpus"]], tiny_data["tokenizer"], str(tmp_path / "one"), batch_documents=7)
    two = encode_corpus([tiny_data["corpus"]], tiny_data["tokenizer"], str(tmp_path / "two"), workers=2,
                        batch_documents=7)
    assert (one.documents, one.tokens) == (two.documents, two.tokens) == (300, one.tokens)
    for suffix in (".bin", ".idx"):
        with open(one.prefix + suffix, "rb") as a, open(two.prefix + suffix, "rb") as b:
            assert a.read() == b.read(), suffix
    assert two.tokens_per_s > 0


def test_trained_tokenizer_keeps_special_tokens_and_falls_back_to_bytes(tiny_data, tmp_path):
    import sentencepiece as spm

    from megamoe.data.preprocess import train_tokenizer

    model = train_tokenizer([tiny_data["corpus"]], str(tmp_path / "spm"), vocab_size=400,
                            special_tokens=("<|user|>",))
    processor = spm.SentencePieceProcessor(model_file=model)
    assert [processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id()] == [0, 1, 2, 3]
    user = processor.piece_to_id("<|user|>")
    assert user != processor.unk_id() and user in processor.encode("hi <|user|> there")
    assert processor.unk_id() not in processor.encode("€ 漢")  # bytes, not <unk>
    plain = spm.SentencePieceProcessor(model_file=train_tokenizer(  # lossless models need byte fallback
        [tiny_data["corpus"]], str(tmp_path / "plain"), vocab_size=400, byte_fallback=False, normalize=True))
    assert plain.unk_id() in plain.encode("漢")


def test_describe_dataset_counts_and_decodes(tiny_data):
    from megamoe.data.preprocess import describe_dataset

    docs = list(read_documents(tiny_data["corpus"]))
    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    lengths = [len(tokenizer.tokenize(d)) + 1 for d in docs]
    short = lengths.index(min(lengths))
    info = describe_dataset(tiny_data["prefix"], tiny_data["tokenizer"], sample=short, sample_tokens=10_000)
    assert (info["documents"], info["tokens"], info["doc_tokens_max"]) == (300, sum(lengths), max(lengths))
    assert info["sample_ids"][-1] == tokenizer.eod and info["sample_text"] == docs[short]
    with pytest.raises(ValueError, match="outside the 300 documents"):
        describe_dataset(tiny_data["prefix"], sample=300)


def _copy_dataset(tiny_data, tmp_path) -> str:
    import shutil

    prefix = str(tmp_path / "copy_text_document")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(tiny_data["prefix"] + suffix, prefix + suffix)
    return prefix


def _start_with(tiny_data, prefix: str, capsys, tokenizer: str | None = None, *overrides: str) -> str:
    """Run the launcher's checks on a dataset; its one-line error."""
    from launchers.pretrain import main

    args = ["--config", str(ROOT / "configs" / "tiny-dense.yaml"), f"data.data_path=[{prefix}]",
            f"data.tokenizer_model={tokenizer or tiny_data['tokenizer']}", *overrides]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_truncated_bin_is_refused_naming_the_file(tiny_data, tmp_path, capsys):
    prefix = _copy_dataset(tiny_data, tmp_path)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    assert f"{prefix}.bin has" in _start_with(tiny_data, prefix, capsys)


def test_a_corrupt_index_is_refused_naming_the_file(tiny_data, tmp_path, capsys):
    prefix = _copy_dataset(tiny_data, tmp_path)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"GARBAGE!")
    assert f"{prefix}.idx is not a Megatron index file" in _start_with(tiny_data, prefix, capsys)


def test_an_index_claiming_too_many_sequences_is_refused_without_reading_them(tiny_data, tmp_path, capsys):
    from megamoe.data.checks import IDX_MAGIC

    prefix = _copy_dataset(tiny_data, tmp_path)
    with open(prefix + ".idx", "r+b") as f:  # the sequence count after magic, version and dtype code
        f.seek(len(IDX_MAGIC) + 8 + 1)
        f.write((1 << 40).to_bytes(8, "little"))
    assert f"{prefix}.idx is truncated" in _start_with(tiny_data, prefix, capsys)


def test_data_tokenized_with_another_tokenizer_is_refused(tiny_data, tmp_path, capsys):
    from megamoe.data.preprocess import train_tokenizer

    other = train_tokenizer([tiny_data["corpus"]], str(tmp_path / "other"), vocab_size=600)
    err = _start_with(tiny_data, _copy_dataset(tiny_data, tmp_path), capsys, tokenizer=other)
    assert "was tokenized with" in err and "not data.tokenizer_model=" in err


def test_an_empty_corpus_is_an_error_and_writes_nothing(tiny_data, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents in"):
        encode_corpus([str(tmp_path / "empty.jsonl")], tiny_data["tokenizer"], str(tmp_path / "empty"))
    assert not list(tmp_path.glob("empty_text_document*"))


def test_lines_that_are_not_utf8_are_skipped_and_counted(tiny_data, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "good one"}\n{"text": "bad \xff\xfe"}\n{"text": "good two"}\n')
    report = encode_corpus([str(path)], tiny_data["tokenizer"], str(tmp_path / "mixed"))
    assert report.documents == 2 and report.skipped_lines == 1
    meta = json.loads((tmp_path / "mixed_text_document.meta.json").read_text())
    assert meta["skipped_lines"] == 1 and meta["first_skipped"].endswith("mixed.jsonl:2")


def test_a_line_that_is_not_json_names_its_place(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not JSON"):
        list(read_documents(path))


def _dataset_of(path, docs: list[list[int]], dtype=np.uint16) -> str:
    """An indexed dataset holding exactly `docs`, written by megatron-core's builder (no sidecar)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(path / "custom_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.mark.timeout(60)  # megatron's epoch count spun forever on an empty split
@pytest.mark.parametrize("case", ["tiny_share", "one_document"])
def test_a_split_without_documents_is_refused_instead_of_hanging(case, tiny_data, tmp_path, capsys):
    if case == "tiny_share":
        prefix, split = _copy_dataset(tiny_data, tmp_path), "100,0.0001,0"
    else:
        prefix, split = _dataset_of(tmp_path, [list(range(4, 300))]), "969,30,1"
    err = _start_with(tiny_data, prefix, capsys, None, f"data.split={split}")
    assert f"data.split='{split}' gives the validation split of {prefix} no document" in err, err


@pytest.mark.parametrize("ids, dtype", [(600, np.uint16), (2000, np.uint16), (-5, np.int16)],
                         ids=["padding_rows", "beyond_padding", "negative"])
def test_ids_outside_the_tokenizer_are_refused(ids, dtype, tiny_data, tmp_path, capsys):
    """A 512-piece tokenizer padded to 1024 rows: id 600 would train the padding rows without a word (and 2000
    fail with an IndexError on some rank, -5 anywhere)."""
    prefix = _dataset_of(tmp_path, [[ids, 7] * 100 for _ in range(20)], dtype)
    err = _start_with(tiny_data, prefix, capsys, None, "model.make_vocab_size_divisible_by=1024")
    assert f"{prefix}.bin holds token ids {min(ids, 7)}..{max(ids, 7)}, outside the tokenizer's 0..511" in err, err


def test_the_id_range_recorded_at_preprocessing_stands_for_a_scan(tiny_data, tmp_path):
    from megamoe.data.checks import id_range, read_index

    report = encode_corpus([tiny_data["corpus"]], tiny_data["tokenizer"], str(tmp_path / "c"))
    meta = json.loads((tmp_path / "c_text_document.meta.json").read_text())
    dataset = read_index(report.prefix)
    assert id_range(dataset, meta) == id_range(dataset) == (meta["min_id"], meta["max_id"])
    tokens = np.memmap(dataset.bin_path, dtype=dataset.dtype, mode="r+")
    tokens[0] = 511
    tokens.flush()
    del tokens  # the file changed: its modification time no longer matches the record, which is not trusted
    assert id_range(dataset, meta)[1] == 511


@pytest.mark.parametrize("damage", ["boundaries", "empty_bin", "sidecar"])
def test_damaged_dataset_files_are_refused_in_one_line(damage, tiny_data, tmp_path, capsys):
    prefix = _copy_dataset(tiny_data, tmp_path)
    if damage == "boundaries":
        idx = Path(prefix + ".idx")
        raw = bytearray(idx.read_bytes())
        raw[-8:] = (int.from_bytes(raw[-8:], "little") + 7).to_bytes(8, "little")  # the last document boundary
        idx.write_bytes(bytes(raw))
        expected = f"{prefix}.idx: its document boundaries or sequence lengths do not describe its 300 sequences"
    elif damage == "empty_bin":
        Path(prefix + ".bin").write_bytes(b"")
        expected = f"{prefix}.bin has 0 bytes but its index describes"
    else:
        Path(prefix + ".meta.json").write_text("{truncated")
        expected = f"{prefix}.meta.json is not JSON (damaged)"
    assert expected in _start_with(tiny_data, prefix, capsys)


def test_a_replaced_dataset_does_not_read_the_index_cache_of_the_old_one(tiny_data, tmp_path):
    """megatron caches sample indices by prefix: a smaller dataset written under the same prefix read the old
    index (IndexError). The cache path holds a fingerprint of the files."""
    from megamoe import config
    from megamoe.config import validate
    from megamoe.data.loader import build_datasets

    prefix = _copy_dataset(tiny_data, tmp_path)
    cfg = config.load(ROOT / "configs" / "tiny-dense.yaml", [f"data.data_path=[{prefix}]", "data.seq_length=32",
                                                               f"data.tokenizer_model={tiny_data['tokenizer']}"])
    layout = validate(cfg, config.Environment(world_size=1, cuda_available=False, tokenizer_vocab_size=512))
    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    build_datasets(cfg, layout, tokenizer)
    _dataset_of(tmp_path, [list(range(4, 60)) for _ in range(12)])
    for suffix in (".bin", ".idx"):
        (tmp_path / f"custom_text_document{suffix}").replace(prefix + suffix)
    train = build_datasets(cfg, layout, tokenizer).train
    assert all(int(train[i]["tokens"].max()) < 60 for i in range(len(train)))


@pytest.mark.parametrize("workers", [1, 0])
def test_a_bin_truncated_while_training_is_named(workers, tiny_data, tmp_path):
    """A .bin cut short under a running job: the data worker reading it dies of SIGBUS, and PyTorch raises that
    wherever the rank is (blamed_on_changed_files names the file); read in the rank, the periodic size check stops
    it before the read."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megamoe.data.checks import DataFileError, read_index
    from megamoe.data.loader import IntactBatches, blamed_on_changed_files

    prefix = _copy_dataset(tiny_data, tmp_path)
    dataset, files = IndexedDataset(prefix), (read_index(prefix),)
    loader = torch.utils.data.DataLoader(range(len(dataset)), batch_size=1, num_workers=workers,
                                         collate_fn=lambda index: torch.from_numpy(dataset[index[0]].astype(np.int64)))
    batches = iter(IntactBatches(loader, files, interval_s=3600.0 if workers else 0.0))
    next(batches)
    os.truncate(prefix + ".bin", 1024)
    with pytest.raises(DataFileError, match=rf"while training: {prefix}.bin has 1024 bytes but its index describes"), \
            blamed_on_changed_files(files):
        for _ in batches:
            pass


def test_a_failed_preprocessing_run_leaves_the_existing_dataset_and_tokenizer(tiny_data, tmp_path):
    from tools.preprocess_data import main

    good = tmp_path / "good.jsonl"
    good.write_text(Path(tiny_data["corpus"]).read_text())
    assert main(["--input", str(good), "--output-prefix", str(tmp_path / "c"), "--train-tokenizer",
                 "--vocab-size", "400"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("c")}
    lines = good.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:200] + ["{not json"] + lines[200:]) + "\n")
    for extra in (["--tokenizer-model", str(tmp_path / "c.model")], ["--train-tokenizer", "--vocab-size", "300"]):
        assert main(["--input", str(bad), "--output-prefix", str(tmp_path / "c"), *extra]) == 2
        after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name not in ("good.jsonl", "bad.jsonl")}
        assert after == before, sorted(after)  # nothing replaced, nothing half-written left beside them


@pytest.mark.parametrize("case", ["binary", "vocab_too_large", "vocab_zero", "missing_tokenizer", "not_text",
                                  "corrupt_gzip", "parent_is_a_file"])
def test_preprocessing_mistakes_are_one_line(case, tiny_data, tmp_path, capsys):
    from tools.preprocess_data import main

    args = ["--input", tiny_data["corpus"], "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
            tiny_data["tokenizer"]]
    if case == "binary":
        (tmp_path / "binary.txt").write_bytes(Path(sys.executable).read_bytes()[:300_000])
        args[1], expected = str(tmp_path / "binary.txt"), "are not text (not UTF-8 or holding NUL bytes"
    elif case == "vocab_too_large":
        args[4:6], expected = ["--train-tokenizer", "--vocab-size", "100000"], "--vocab-size 100000 is too large"
    elif case == "vocab_zero":
        args[4:6], expected = ["--train-tokenizer", "--vocab-size", "0"], "--vocab-size 0 must be at least 8"
    elif case == "missing_tokenizer":
        args[5], expected = str(tmp_path / "missing.model"), "missing.model' does not exist"
    elif case == "not_text":
        (tmp_path / "n.jsonl").write_text('{"text": "fine"}\n{"text": 12345}\n')
        args[1], expected = str(tmp_path / "n.jsonl"), "n.jsonl:2: 'text' is int, not text"
    elif case == "corrupt_gzip":
        (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(Path(tiny_data["corpus"]).read_bytes())[:5000])
        args[1], expected = str(tmp_path / "c.jsonl.gz"), "c.jsonl.gz cannot be read to the end"
    else:
        (tmp_path / "afile").write_text("x")
        args[3], expected = str(tmp_path / "afile" / "out"), f"cannot be created ({tmp_path / 'afile'} is a file)"
    with contextlib.suppress(SystemExit):  # argparse's parser.error exits 2
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and "Traceback" not in "\n".join(err), err
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*")), "nothing written"
