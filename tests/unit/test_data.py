"""Preprocessing into Megatron indexed datasets, and the data-parallel sample order."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from megamoe.data.loader import MicroBatchSampler
from megamoe.data.preprocess import encode_corpus, read_documents
from megamoe.data.tokenizer import load_tokenizer, spm_vocab_size


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
            "train": len(datasets.train), "valid": len(datasets.valid), "keys": sorted(sample),
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
    plain = spm.SentencePieceProcessor(model_file=train_tokenizer(
        [tiny_data["corpus"]], str(tmp_path / "plain"), vocab_size=400, byte_fallback=False))
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
