"""Checks of the dataset files before training reads them: a truncated, foreign or unusable file fails at start-up
with the file named, instead of as garbage tokens, an index error or a hang hours later.

Megatron's .idx: b"MMIDIDX\\x00\\x00", version <Q> 1, dtype code <B>, sequences <Q>, documents <Q>, then int32
sequence lengths, int64 byte offsets and int64 document boundaries (0, ..., sequences); the .bin holds the tokens
back to back, so its size is the sum of the lengths times the dtype's width. megamoe's preprocessing also writes
`<prefix>.meta.json` naming the tokenizer it used and the range of the ids it wrote (for that very .bin: its size
and modification time); files without one (Megatron-LM's) are scanned for their id range instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamoe.data.tokenizer import tokenizer_sha256

IDX_MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
SCAN_BLOCK = 1 << 26  # tokens per block of the id-range scan (128 MB of uint16)


class DataFileError(ValueError):
    """A dataset file that must not be used (the message names it and says what to do)."""


@dataclass(frozen=True)
class IndexedDataset:
    """What a dataset's .idx says about its .bin."""

    prefix: str
    dtype: np.dtype
    lengths: np.ndarray
    """int32 tokens per sequence (megatron's unit of splitting; one document each in megamoe's files)."""

    @property
    def bin_path(self) -> Path:
        return Path(self.prefix + ".bin")

    @property
    def bin_bytes(self) -> int:
        return int(self.lengths.astype(np.int64).sum()) * self.dtype.itemsize


def sidecar_path(prefix: str) -> Path:
    return Path(prefix + ".meta.json")


def read_index(prefix: str) -> IndexedDataset:
    """The index of `prefix`, checked against its .bin (DataFileError naming the file and the problem)."""
    idx = Path(prefix + ".idx")
    try:
        with idx.open("rb") as f:
            header = f.read(len(IDX_MAGIC) + 8 + 1 + 8 + 8)
            if len(header) < len(IDX_MAGIC) + 25 or not header.startswith(IDX_MAGIC):
                raise DataFileError(f"{idx} is not a Megatron index file (bad header); rerun tools/preprocess_data.py")
            version, code, sequences, documents = struct.unpack("<QBQQ", header[len(IDX_MAGIC):])
            if version != 1 or code not in DTYPES:
                raise DataFileError(f"{idx} has index version {version} / dtype code {code}, which megatron-core "
                                    "cannot read")
            # Sizes before reading: a damaged count must not make us allocate terabytes.
            index_bytes = len(header) + sequences * (4 + 8) + documents * 8
            if idx.stat().st_size < index_bytes:
                raise DataFileError(f"{idx} is truncated ({idx.stat().st_size} bytes, its header needs "
                                    f"{index_bytes}); rerun preprocessing")
            lengths = np.fromfile(f, dtype=np.int32, count=sequences)
            f.seek(sequences * 8, os.SEEK_CUR)  # byte offsets: derived from the lengths
            boundaries = np.fromfile(f, dtype=np.int64, count=documents)
    except OSError as err:
        raise DataFileError(f"{idx} cannot be read: {err.strerror or err}") from None
    if documents < 1 or boundaries[0] != 0 or boundaries[-1] != sequences or np.any(np.diff(boundaries) < 0) \
            or np.any(lengths < 0):
        raise DataFileError(f"{idx}: its document boundaries or sequence lengths do not describe its {sequences} "
                            "sequences (a damaged or hand-edited index); rerun preprocessing")
    dataset = IndexedDataset(prefix=prefix, dtype=np.dtype(DTYPES[code]), lengths=lengths)
    require_bin_intact(dataset)
    return dataset


def require_bin_intact(dataset: IndexedDataset) -> None:
    """DataFileError unless the .bin holds exactly the bytes its index describes (also while training: a file
    truncated or replaced under a running job)."""
    try:
        size = dataset.bin_path.stat().st_size
    except OSError as err:
        raise DataFileError(f"{dataset.bin_path} cannot be read: {err.strerror or err}") from None
    if size != dataset.bin_bytes:
        raise DataFileError(f"{dataset.bin_path} has {size} bytes but its index describes {dataset.bin_bytes} "
                            f"({len(dataset.lengths)} sequences of {dataset.dtype.name}): the file is truncated or "
                            "belongs to another index; rerun preprocessing (or restore the file)")


def check_indexed_dataset(prefix: str, tokenizer_model: str, vocab_size: int,
                          tokenizer_type: str = "SentencePieceTokenizer") -> IndexedDataset:
    """The dataset `prefix` if training may read it with this tokenizer (DataFileError otherwise): an intact
    index and .bin, made with this tokenizer (when recorded), every id a token of it."""
    dataset = read_index(prefix)
    if np.issubdtype(dataset.dtype, np.integer) and vocab_size > np.iinfo(dataset.dtype).max + 1:
        raise DataFileError(f"{dataset.bin_path} stores {dataset.dtype.name} tokens, too narrow for the tokenizer's "
                            f"{vocab_size} ids")
    meta = _read_sidecar(prefix)
    if meta is not None and (meta.get("vocab_size") != vocab_size
                             or meta.get("tokenizer_sha256") != tokenizer_sha256(tokenizer_model, tokenizer_type)):
        raise DataFileError(f"{prefix} was tokenized with {meta.get('tokenizer_model')} ({meta.get('vocab_size')} "
                            f"pieces), not data.tokenizer_model={tokenizer_model} ({vocab_size} pieces): use that "
                            "tokenizer or re-tokenize")
    low, high = id_range(dataset, meta)
    if low < 0 or high >= vocab_size:
        raise DataFileError(f"{dataset.bin_path} holds token ids {low}..{high}, outside the tokenizer's 0.."
                            f"{vocab_size - 1} ({tokenizer_model}): it was made with another tokenizer or is "
                            "damaged; re-tokenize it with this one")
    return dataset


def _read_sidecar(prefix: str) -> dict | None:
    sidecar = sidecar_path(prefix)
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataFileError(f"{sidecar} is not JSON (damaged); delete it to use the dataset without the tokenizer "
                            "check, or rerun preprocessing") from None
    if not isinstance(meta, dict):
        raise DataFileError(f"{sidecar} holds no record of the tokenizer (damaged); delete it or rerun preprocessing")
    return meta


def bin_stamp(path: Path) -> dict:
    """Size and modification time: a record made for this .bin is not trusted for another."""
    stat = path.stat()
    return {"bin_bytes": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}


def id_range(dataset: IndexedDataset, meta: dict | None = None) -> tuple[int, int]:
    """Smallest and largest token id of the .bin: from the sidecar when it was written for this very file, else
    one pass over it (memory-mapped, in blocks). (0, 0) for an empty dataset."""
    if meta is not None and "min_id" in meta and all(meta.get(k) == v for k, v in bin_stamp(dataset.bin_path).items()):
        return int(meta["min_id"]), int(meta["max_id"])
    count = dataset.bin_bytes // dataset.dtype.itemsize
    if count == 0:
        return 0, 0
    tokens = np.memmap(dataset.bin_path, dtype=dataset.dtype, mode="r", shape=(count,))
    low, high = None, None
    for start in range(0, count, SCAN_BLOCK):
        block = tokens[start:start + SCAN_BLOCK]
        low = block.min() if low is None else min(low, block.min())
        high = block.max() if high is None else max(high, block.max())
    return int(low), int(high)


def split_bounds(split: str, num_sequences: int) -> list[tuple[int, int] | None]:
    """The sequences [begin, end) megatron gives each of the train, valid and test splits (None: a zero share),
    by megatron's own arithmetic."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if part is None else (int(round(part[0] * num_sequences)), int(round(part[1] * num_sequences)))
            for part in matrix]


SPLIT_NAMES = ("training", "validation", "test")


def split_sizes(dataset: IndexedDataset, split: str) -> list[tuple[int, int] | None]:
    """(documents, tokens) of the train, valid and test splits (None: a zero share)."""
    return [None if bounds is None else
            (bounds[1] - bounds[0], int(dataset.lengths[bounds[0]:bounds[1]].astype(np.int64).sum()))
            for bounds in split_bounds(split, len(dataset.lengths))]


def check_splits(dataset: IndexedDataset, split: str, seq_length: int) -> list[str]:
    """DataFileError if a split with a non-zero share gets no tokens (megatron would loop forever counting the
    epochs it needs) or the training split holds less than one sample; returns warnings (a validation split
    shorter than a sample)."""
    warnings = []
    for name, size in zip(SPLIT_NAMES, split_sizes(dataset, split), strict=True):
        if size is None:
            continue
        tokens = size[1]
        if tokens == 0:
            raise DataFileError(f"data.split='{split}' gives the {name} split of {dataset.prefix} no document (it has "
                                f"{len(dataset.lengths)} in all): give that split a larger share, a share of 0, or "
                                "use more data")
        if tokens < seq_length + 1:
            problem = (f"the {name} split of {dataset.prefix} holds {tokens} tokens, less than one sample of "
                       f"data.seq_length={seq_length} (+1)")
            if name == "training":
                raise DataFileError(f"{problem}: every sample would repeat it; shorten data.seq_length or use "
                                    "more data")
            warnings.append(f"{problem}: its samples repeat it")
    return warnings


def sample_index_bytes(num_samples: int, seq_length: int, documents: int, tokens: int) -> int:
    """Memory megatron's GPTDataset takes to build its indices for `num_samples` samples of a split of `documents`
    documents and `tokens` tokens: the document index (int32 per document and epoch), the sample index (two int64 per
    sample) and the shuffle index (int64 per sample), each with a temporary copy while it is built."""
    epochs = -(-(num_samples * seq_length + 1) // max(tokens, 1))
    return 2 * (4 * epochs * documents + 16 * (num_samples + 1) + 8 * num_samples)


def dataset_fingerprint(prefixes: list[str]) -> str:
    """Changes whenever a dataset file is replaced: part of the index-cache path, so that a cache built for
    other files (megatron keys it by the prefix alone) is never read for these."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            stat = Path(prefix + suffix).stat()
            digest.update(f"{os.path.abspath(prefix)}{suffix}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]
