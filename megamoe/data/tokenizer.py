"""The sentencepiece tokenizer, through megatron-core's tokenizer API (local files only, never a hub)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


def load_tokenizer(model_path: str | Path):
    """megatron-core's MegatronTokenizer over a local sentencepiece model (`.tokenize`, `.eod`, ...)."""
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(tokenizer_path=str(model_path),
                                             metadata_path={"library": "sentencepiece"})


def spm_vocab_size(model_path: str | Path) -> int | None:
    """Vocabulary size of a sentencepiece model file, or None if there is no such file (cheap: no megatron)."""
    if not Path(model_path).is_file():
        return None
    return spm.SentencePieceProcessor(model_file=str(model_path)).vocab_size()
