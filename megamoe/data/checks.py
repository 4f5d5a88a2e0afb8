"""Checks of the dataset files before training reads them: a truncated or foreign file fails at start-up with the
file named, instead of as garbage tokens or an index error hours later.

Megatron's .idx: b"MMIDIDX\\x00\\x00", version <Q> 1, dtype code <B>, sequences <Q>, documents <Q>, then int32
sequence lengths, int64 byte offsets and int64 document boundaries; the .bin holds the tokens back to back, so
its size is the sum of the lengths times the dtype's width. megamoe's preprocessing also writes
`<prefix>.meta.json` naming the tokenizer it used; files without one (Megatron-LM's) are checked for size only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from megamoe.utils import file_sha256

IDX_MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def sidecar_path(prefix: str) -> Path:
    return Path(prefix + ".meta.json")


def check_indexed_dataset(prefix: str, tokenizer_model: str, vocab_size: int) -> str | None:
    """Why `prefix`'s .bin/.idx must not be used with this tokenizer, or None if they look right."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    try:
        with idx.open("rb") as f:
            header = f.read(len(IDX_MAGIC) + 8 + 1 + 8 + 8)
            if len(header) < len(IDX_MAGIC) + 25 or not header.startswith(IDX_MAGIC):
                return f"{idx} is not a Megatron index file (bad header); rerun tools/preprocess_data.py"
            version, code, sequences, documents = struct.unpack("<QBQQ", header[len(IDX_MAGIC):])
            if version != 1 or code not in DTYPES:
                return f"{idx} has index version {version} / dtype code {code}, which megatron-core cannot read"
            # Sizes before reading: a damaged count must not make us allocate terabytes.
            index_bytes = len(header) + sequences * (4 + 8) + documents * 8
            if idx.stat().st_size < index_bytes:
                return (f"{idx} is truncated ({idx.stat().st_size} bytes, its header needs {index_bytes}); "
                        "rerun preprocessing")
            lengths = np.fromfile(f, dtype=np.int32, count=sequences)
    except OSError as err:
        return f"{idx} cannot be read: {err}"
    dtype = np.dtype(DTYPES[code])
    expected = int(lengths.astype(np.int64).sum()) * dtype.itemsize
    if (size := bin_.stat().st_size) != expected:
        return (f"{bin_} has {size} bytes but its index describes {expected} ({sequences} sequences of "
                f"{dtype.name}): the file is truncated or belongs to another index; rerun preprocessing")
    if np.issubdtype(dtype, np.integer) and vocab_size > np.iinfo(dtype).max + 1:
        return f"{bin_} stores {dtype.name} tokens, too narrow for the tokenizer's {vocab_size} ids"
    return _check_sidecar(prefix, tokenizer_model, vocab_size)


def _check_sidecar(prefix: str, tokenizer_model: str, vocab_size: int) -> str | None:
    sidecar = sidecar_path(prefix)
    if not sidecar.is_file():
        return None
    meta = json.loads(sidecar.read_text())
    if meta.get("vocab_size") != vocab_size or meta.get("tokenizer_sha256") != file_sha256(tokenizer_model):
        return (f"{prefix} was tokenized with {meta.get('tokenizer_model')} ({meta.get('vocab_size')} pieces), not "
                f"data.tokenizer_model={tokenizer_model} ({vocab_size} pieces): use that tokenizer or re-tokenize")
    return None
