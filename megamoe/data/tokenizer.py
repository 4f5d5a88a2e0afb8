"""Tokenizers as Megatron-LM names them, from local files only (never a hub).

`SentencePieceTokenizer`: a sentencepiece `.model`, through megatron-core's tokenizer API (as before).
`HuggingFaceTokenizer`: a `tokenizer.json` (or a directory holding one) through the `tokenizers` library, the
format of every current Hugging Face checkpoint (Llama 3, Qwen2/3, OLMoE, Mistral).

Both give what megamoe and megatron-core's datasets use: `vocab_size`, `tokenize(text)`, `detokenize(ids)`, `eod`
(the end-of-document id appended after every document), `pad`, and the `<mask>` id of masked-LM training.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal

import sentencepiece as spm

TokenizerType = Literal["SentencePieceTokenizer", "HuggingFaceTokenizer"]
TOKENIZER_TYPES: tuple[str, ...] = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
MASK_PIECE = "<mask>"
EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
"""Tokens a tokenizer.json may use for end of document, in order of preference (its post-processor aside)."""
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")


def load_tokenizer(path: str | Path, kind: str = "SentencePieceTokenizer"):
    """The tokenizer of `kind` in `path` (ValueError naming the file when it is not one)."""
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(path)
    from megatron.core.tokenizers import MegatronTokenizer

    _processor(path)  # a clear error first: megatron's would be a bare sentencepiece RuntimeError
    return MegatronTokenizer.from_pretrained(tokenizer_path=str(path), metadata_path={"library": "sentencepiece"})


class HuggingFaceTokenizer:
    """A `tokenizers.Tokenizer` with megatron-core's tokenizer attributes. Text is encoded without the
    post-processor's special tokens (BOS): documents are separated by `eod` alone, as in pre-training. A special
    token's text inside a document ("</s>" in an HTML page) is text, as with sentencepiece: only preprocessing puts
    the end-of-document id between documents."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.path = str(path)
        self.file = tokenizer_file(path)
        try:
            self._tokenizer = Tokenizer.from_file(str(self.file))
        except Exception as err:  # tokenizers raises its own Exception subclass with serde's message
            raise ValueError(f"'{self.file}' is not a Hugging Face tokenizer.json ({str(err).splitlines()[0]}): a "
                             "damaged or truncated file, or another format") from None
        self._tokenizer.encode_special_tokens = True  # literal special-token text is encoded as text
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod = _special_id(self._tokenizer, self.file, EOD_CANDIDATES, "end-of-document")
        self.pad = _special_id(self._tokenizer, self.file, PAD_CANDIDATES, None)
        self.mask = self._tokenizer.token_to_id(MASK_PIECE)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id)

    def is_added_token(self, token_id: int) -> bool:
        """An added token (matched whole wherever it appears in a text), not a piece of the model's vocabulary."""
        return token_id in self._tokenizer.get_added_tokens_decoder()

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron-core's dataset cache keys name the tokenizer by."""
        return OrderedDict([("class", "megamoe.HuggingFaceTokenizer"), ("tokenizer_path", str(self.file))])


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json of a HuggingFaceTokenizer path (the file, or a directory holding it)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"'{path}' holds no tokenizer.json; give a Hugging Face tokenizer directory or file")
        return path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"'{path}' does not exist; give a tokenizer.json or a directory holding one")
    return path


def _special_id(tokenizer, file: Path, candidates: tuple[str, ...], required: str | None) -> int | None:
    for token in candidates:
        if (token_id := tokenizer.token_to_id(token)) is not None:
            return token_id
    if required:
        raise ValueError(f"'{file}' has no {required} token (one of {', '.join(candidates)}); add one to the "
                         "tokenizer or train one with tools/preprocess_data.py --train-tokenizer")
    return None


def special_token_ids(path: str | Path, kind: str = "SentencePieceTokenizer") -> dict[str, int | None]:
    """pad, bos and eos (the end-of-document token) ids as transformers' configs name them; None where the
    tokenizer has none."""
    if kind == "HuggingFaceTokenizer":
        tokenizer = HuggingFaceTokenizer(path)
        bos = _special_id(tokenizer._tokenizer, tokenizer.file, BOS_CANDIDATES, None)
        return {"pad_token_id": tokenizer.pad, "bos_token_id": bos, "eos_token_id": tokenizer.eod}
    processor = _processor(path)
    ids = {"pad_token_id": processor.pad_id(), "bos_token_id": processor.bos_id(), "eos_token_id": processor.eos_id()}
    return {name: (i if i >= 0 else None) for name, i in ids.items()}  # sentencepiece says -1 for none


def sentencepiece_special_pieces(path: str | Path) -> dict[str, str]:
    """bos, eos, unk and pad pieces of a sentencepiece model as transformers names them; only those it has (a
    Llama 2 model has no pad)."""
    processor = _processor(path)
    ids = {"bos_token": processor.bos_id(), "eos_token": processor.eos_id(), "unk_token": processor.unk_id(),
           "pad_token": processor.pad_id()}
    return {name: processor.id_to_piece(i) for name, i in ids.items() if i >= 0}


def kind_of(path: str | Path) -> str:
    """The tokenizer type a file is by its name: a tokenizer.json (or a directory) is HuggingFaceTokenizer, anything
    else a sentencepiece model (for tools that take a tokenizer without a type)."""
    path = Path(path)
    return "HuggingFaceTokenizer" if path.is_dir() or path.suffix == ".json" else "SentencePieceTokenizer"


def tokenizer_problem(path: str | Path, kind: str) -> str | None:
    """Why `path` is not a tokenizer of `kind` (one line), or None."""
    if kind == "SentencePieceTokenizer" and not Path(path).is_file():
        return f"'{path}' {'is a directory' if Path(path).is_dir() else 'does not exist'}; give a sentencepiece .model"
    try:
        HuggingFaceTokenizer(path) if kind == "HuggingFaceTokenizer" else _processor(path)
    except ValueError as err:
        return str(err)
    return None


def vocab_size(path: str | Path, kind: str = "SentencePieceTokenizer") -> int | None:
    """Vocabulary size of a tokenizer file, or None if there is no such file (cheap: no megatron)."""
    if not Path(path).exists():
        return None
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(path).vocab_size
    return _processor(path).vocab_size() if Path(path).is_file() else None


def embedding_rows(cfg) -> int | None:
    """Rows of a run's embedding and output layer: model.vocab_size (an imported vocabulary padded beyond its
    tokenizer, as Qwen ships), else the tokenizer's vocabulary (None when the tokenizer file is missing)."""
    return cfg.model.vocab_size or vocab_size(cfg.data.tokenizer_model, cfg.data.tokenizer_type)


def mask_id(path: str | Path, kind: str = "SentencePieceTokenizer") -> int | None:
    """Id of the <mask> piece (added by megamoe's tokenizer training), or None."""
    if not Path(path).exists():
        return None
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(path).mask
    if not Path(path).is_file():
        return None
    processor = _processor(path)
    piece_id = processor.piece_to_id(MASK_PIECE)
    return None if piece_id == processor.unk_id() else piece_id


def spm_mask_id(model_path: str | Path) -> int | None:
    """mask_id of a sentencepiece model."""
    return mask_id(model_path, "SentencePieceTokenizer")


def spm_vocab_size(model_path: str | Path) -> int | None:
    """vocab_size of a sentencepiece model."""
    return vocab_size(model_path, "SentencePieceTokenizer")


def _processor(model_path: str | Path) -> spm.SentencePieceProcessor:
    """ValueError naming the file if it is not a sentencepiece model (sentencepiece says only INTERNAL: ...)."""
    try:
        return spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as err:
        raise ValueError(f"'{model_path}' is not a sentencepiece model ({str(err).split(': ', 1)[-1]}); point it at "
                         "the .model file written by tools/preprocess_data.py") from None


def tokenizer_sha256(path: str | Path, kind: str = "SentencePieceTokenizer") -> str:
    """SHA-256 of the tokenizer file itself (a directory's tokenizer.json)."""
    from megamoe.utils import file_sha256

    return file_sha256(tokenizer_file(path) if kind == "HuggingFaceTokenizer" else Path(path))


def tokenizer_identity(path: str | Path, kind: str = "SentencePieceTokenizer") -> dict:
    """What identifies the tokenizer a dataset or a checkpoint was made with: its kind, path, SHA-256 and size."""
    return {"tokenizer_type": kind, "tokenizer_model": str(path), "tokenizer_sha256": tokenizer_sha256(path, kind),
            "vocab_size": vocab_size(path, kind)}
