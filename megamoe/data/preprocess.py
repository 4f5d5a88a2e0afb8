"""Corpus -> sentencepiece model -> Megatron indexed dataset (.bin/.idx) via megatron.core.datasets.

Files are those of Megatron-LM's tools/preprocess_data.py: `<output_prefix>_<json_key>_document.{bin,idx}`,
one document per JSON line, end-of-document token appended.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from megamoe.data.tokenizer import MASK_PIECE

# Fixed special ids: pad 0, unk 1, bos 2, eos 3 (the end-of-document token).
SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}


def read_documents(path: str | Path, json_key: str = "text") -> Iterator[str]:
    """Documents of a .jsonl, .jsonl.gz or .txt (one document per line) file; blank lines skipped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    is_json = ".jsonl" in path.name or ".json" in path.name
    with opener(path, "rt", encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if not is_json:
                yield line.rstrip("\n")
                continue
            record = json.loads(line)
            if json_key not in record:
                raise ValueError(f"{path}:{lineno} has no '{json_key}' field; pass --json-keys <field>")
            yield record[json_key]


def train_tokenizer(inputs: list[str], model_prefix: str, vocab_size: int, model_type: str = "bpe",
                    json_key: str = "text") -> str:
    """Train a sentencepiece model on the documents of `inputs`; returns the .model path."""
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as corpus:
        for path in inputs:
            for doc in read_documents(path, json_key):
                corpus.write(doc.replace("\n", " ") + "\n")
    try:
        spm.SentencePieceTrainer.train(input=corpus.name, model_prefix=model_prefix, vocab_size=vocab_size,
                                       model_type=model_type, character_coverage=1.0, byte_fallback=True,
                                       user_defined_symbols=[MASK_PIECE], minloglevel=2, **SPECIAL_IDS)
    finally:
        os.unlink(corpus.name)
    return model_prefix + ".model"


def encode_corpus(inputs: list[str], tokenizer_model: str, output_prefix: str,
                  json_key: str = "text") -> tuple[str, int, int]:
    """Tokenize every document (EOD appended) into `<output_prefix>_<json_key>_document`.

    Returns (dataset prefix, documents, tokens).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    from megamoe.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_model)
    prefix = f"{output_prefix}_{json_key}_document"
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size < 65_536 else np.int32
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    num_docs = num_tokens = 0
    for path in inputs:
        for doc in read_documents(path, json_key):
            ids = tokenizer.tokenize(doc) + [tokenizer.eod]
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            num_docs, num_tokens = num_docs + 1, num_tokens + len(ids)
    builder.finalize(get_idx_path(prefix))
    return prefix, num_docs, num_tokens
