"""Corpus -> sentencepiece model -> Megatron indexed dataset (.bin/.idx) via megatron.core.datasets.

Files are those of Megatron-LM's tools/preprocess_data.py: `<output_prefix>_<json_key>_document.{bin,idx}`,
one document per JSON line, end-of-document token appended.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from megamoe.data.tokenizer import MASK_PIECE

# Fixed special ids: pad 0, unk 1, bos 2, eos 3 (the end-of-document token).
SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}


@dataclass
class ReadStats:
    """What reading skipped: lines that are not valid UTF-8 (reported, never silently mangled)."""

    skipped_lines: int = 0
    first_skipped: str = ""
    """path:line of the first one."""


def read_documents(path: str | Path, json_key: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
    """Documents of a .jsonl, .jsonl.gz or .txt (one document per line) file; blank lines skipped, lines that
    are not UTF-8 skipped and counted in `stats`; a line that is not JSON (in .jsonl) is an error."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    is_json = ".jsonl" in path.name or ".json" in path.name
    with opener(path, "rb") as lines:
        for lineno, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if stats is not None:
                    stats.skipped_lines += 1
                    stats.first_skipped = stats.first_skipped or f"{path}:{lineno}"
                continue
            if not line.strip():
                continue
            if not is_json:
                yield line.rstrip("\r\n")  # bytes are read raw: Windows line ends too
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not JSON ({err.msg}); one JSON object per line, or use a "
                                 ".txt file for plain text") from None
            if not isinstance(record, dict) or json_key not in record:
                raise ValueError(f"{path}:{lineno} has no '{json_key}' field; pass --json-keys <field>")
            yield record[json_key]


def train_tokenizer(inputs: list[str], model_prefix: str, vocab_size: int, model_type: str = "bpe",
                    json_key: str = "text", special_tokens: tuple[str, ...] = (), byte_fallback: bool = True) -> str:
    """Train a sentencepiece model on the documents of `inputs`; returns the .model path.

    Ids 0-3 are pad, unk, bos, eos (EOD); `<mask>` and `special_tokens` are single pieces never split. Lines
    that are not UTF-8 are left out here; encode_corpus counts and reports them."""
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    documents = 0
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as corpus:
        for path in inputs:
            for doc in read_documents(path, json_key):
                corpus.write(doc.replace("\n", " ") + "\n")
                documents += 1
    if documents == 0:
        os.unlink(corpus.name)
        raise ValueError(f"no documents to train the tokenizer on in {inputs} (empty, blank or undecodable)")
    try:
        spm.SentencePieceTrainer.train(input=corpus.name, model_prefix=model_prefix, vocab_size=vocab_size,
                                       model_type=model_type, character_coverage=1.0, byte_fallback=byte_fallback,
                                       user_defined_symbols=[MASK_PIECE, *special_tokens], minloglevel=2,
                                       **SPECIAL_IDS)
    finally:
        os.unlink(corpus.name)
    return model_prefix + ".model"


@dataclass
class EncodeReport:
    prefix: str
    documents: int
    tokens: int
    seconds: float
    skipped_lines: int = 0
    """Input lines that were not UTF-8 (skipped)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


_WORKER_TOKENIZER = None


def _load_worker_tokenizer(tokenizer_model: str) -> None:
    global _WORKER_TOKENIZER
    from megamoe.data.tokenizer import load_tokenizer

    _WORKER_TOKENIZER = load_tokenizer(tokenizer_model)


def _encode_batch(docs: list[str]) -> list[list[int]]:
    tokenizer = _WORKER_TOKENIZER
    return [tokenizer.tokenize(doc) + [tokenizer.eod] for doc in docs]


def _batches(inputs: list[str], json_key: str, size: int, stats: ReadStats) -> Iterator[list[str]]:
    batch: list[str] = []
    for path in inputs:
        for doc in read_documents(path, json_key, stats):
            batch.append(doc)
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def encode_corpus(inputs: list[str], tokenizer_model: str, output_prefix: str, json_key: str = "text",
                  workers: int = 1, batch_documents: int = 256, progress: bool = False) -> EncodeReport:
    """Tokenize every document (EOD appended) into `<output_prefix>_<json_key>_document`, in input order.

    `workers` processes tokenize batches of `batch_documents` documents while this one writes them (Megatron's
    IndexedDatasetBuilder); `progress` shows a bar (documents done, tokens/s) on stderr.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    start = time.perf_counter()
    prefix = f"{output_prefix}_{json_key}_document"
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if spm.SentencePieceProcessor(model_file=tokenizer_model).vocab_size() < 65_536 else np.int32
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    stats = ReadStats()
    batches = _batches(inputs, json_key, batch_documents, stats)
    num_docs = num_tokens = 0
    with _tokenized(batches, tokenizer_model, workers) as encoded, _progress_bar(progress) as bar:
        for docs_ids in encoded:
            for ids in docs_ids:
                builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                num_tokens += len(ids)
            num_docs += len(docs_ids)
            bar.update(len(docs_ids))
            bar.set_postfix(tokens_per_s=f"{num_tokens / (time.perf_counter() - start):,.0f}", refresh=False)
    if num_docs == 0:
        Path(get_bin_path(prefix)).unlink(missing_ok=True)
        raise ValueError(f"no documents in {inputs} (empty, or every line blank or not UTF-8): nothing to write")
    builder.finalize(get_idx_path(prefix))
    _write_sidecar(prefix, tokenizer_model, num_docs, num_tokens, stats)
    return EncodeReport(prefix=prefix, documents=num_docs, tokens=num_tokens, seconds=time.perf_counter() - start,
                        skipped_lines=stats.skipped_lines)


def _write_sidecar(prefix: str, tokenizer_model: str, documents: int, tokens: int, stats: ReadStats) -> None:
    """`<prefix>.meta.json`: which tokenizer made the tokens (start-up refuses another, data/checks.py)."""
    from megamoe.data.checks import sidecar_path
    from megamoe.utils import file_sha256

    meta = {"tokenizer_model": str(tokenizer_model), "tokenizer_sha256": file_sha256(tokenizer_model),
            "vocab_size": spm.SentencePieceProcessor(model_file=tokenizer_model).vocab_size(),
            "documents": documents, "tokens": tokens, "skipped_lines": stats.skipped_lines,
            "first_skipped": stats.first_skipped}
    sidecar_path(prefix).write_text(json.dumps(meta, indent=1))


@contextlib.contextmanager
def _tokenized(batches: Iterator[list[str]], tokenizer_model: str, workers: int):
    """Token ids per batch, in order: in this process (workers=1) or a pool of `workers` processes."""
    if workers <= 1:
        _load_worker_tokenizer(tokenizer_model)
        yield map(_encode_batch, batches)
        return
    # fork where there is one: the workers inherit the loaded tokenizer instead of importing megatron again
    # (seconds each); nothing in this process has started threads yet (no torch op has run).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":
        _load_worker_tokenizer(tokenizer_model)
    initializer, initargs = (None, ()) if method == "fork" else (_load_worker_tokenizer, (tokenizer_model,))
    with multiprocessing.get_context(method).Pool(workers, initializer, initargs) as pool:
        yield pool.imap(_encode_batch, batches, chunksize=1)


def _progress_bar(enabled: bool):
    from tqdm import tqdm  # a DeepSpeed dependency

    return tqdm(disable=not enabled, unit=" docs", desc="tokenizing", mininterval=1.0)


def describe_dataset(prefix: str, tokenizer_model: str | None = None, sample: int = 0,
                     sample_tokens: int = 64) -> dict:
    """Documents, tokens and document lengths of an indexed dataset (read by megatron-core's IndexedDataset),
    with document `sample`'s first `sample_tokens` ids, decoded when a tokenizer is given."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    lengths = dataset.sequence_lengths
    if not 0 <= sample < len(dataset):
        raise ValueError(f"--sample {sample} is outside the {len(dataset)} documents of {prefix}")
    ids = dataset[sample][:sample_tokens].tolist()
    out = {"prefix": prefix, "dtype": np.dtype(dataset.index.dtype).name, "documents": len(dataset),
           "tokens": int(lengths.sum()), "doc_tokens_min": int(lengths.min()),
           "doc_tokens_mean": round(float(lengths.mean()), 1), "doc_tokens_max": int(lengths.max()),
           "sample": sample, "sample_ids": ids}
    if tokenizer_model is not None:
        out["sample_text"] = spm.SentencePieceProcessor(model_file=tokenizer_model).decode(ids)
    return out
