"""The sentencepiece tokenizer, through megatron-core's tokenizer API (local files only, never a hub)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


def load_tokenizer(model_path: str | Path):
    """megatron-core's MegatronTokenizer over a local sentencepiece model (`.tokenize`, `.eod`, ...)."""
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(tokenizer_path=str(model_path),
                                             metadata_path={"library": "sentencepiece"})


MASK_PIECE = "<mask>"


def spm_mask_id(model_path: str | Path) -> int | None:
    """Id of the <mask> piece (added by megamoe's tokenizer training), or None."""
    if not Path(model_path).is_file():
        return None
    processor = _processor(model_path)
    piece_id = processor.piece_to_id(MASK_PIECE)
    return None if piece_id == processor.unk_id() else piece_id


def spm_vocab_size(model_path: str | Path) -> int | None:
    """Vocabulary size of a sentencepiece model file, or None if there is no such file (cheap: no megatron)."""
    if not Path(model_path).is_file():
        return None
    return _processor(model_path).vocab_size()


def _processor(model_path: str | Path) -> spm.SentencePieceProcessor:
    """ValueError naming the file if it is not a sentencepiece model (sentencepiece says only INTERNAL: ...)."""
    try:
        return spm.SentencePieceProcessor(model_file=str(model_path))
    except RuntimeError as err:
        raise ValueError(f"'{model_path}' is not a sentencepiece model ({str(err).split(': ', 1)[-1]}); point it at "
                         "the .model file written by tools/preprocess_data.py") from None


def tokenizer_identity(model_path: str | Path) -> dict:
    """What identifies the tokenizer a dataset or a checkpoint was made with: its path, SHA-256 and size."""
    from megamoe.utils import file_sha256

    return {"tokenizer_model": str(model_path), "tokenizer_sha256": file_sha256(model_path),
            "vocab_size": spm_vocab_size(model_path)}
