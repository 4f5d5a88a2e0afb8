"""Corpus -> tokenizer -> Megatron indexed dataset (.bin/.idx) via megatron.core.datasets.

Files are those of Megatron-LM's tools/preprocess_data.py: `<output_prefix>_<json_key>_document.{bin,idx}`, one
dataset per JSON key, one document per JSON line (or per file of a directory: megamoe/data/corpus.py), the
end-of-document token appended unless asked not to.

Tokenizers megamoe trains are lossless by default: decode(encode(text)) == text for any UTF-8 text, line breaks,
tabs, runs of spaces and code included (sentencepiece's one exception: its own whitespace symbol U+2581 in a
text decodes as a space; documents holding it are counted and reported). A sentencepiece model (`<prefix>.model`)
keeps the text unnormalised and spells characters it has no piece for (a line break, a rare symbol) as UTF-8 bytes;
a Hugging Face byte-level BPE (`<prefix>.tokenizer.json`) works on bytes throughout. `normalize=True` trains the
sentencepiece model the older way (NFKC, runs of whitespace collapsed, line breaks lost), for those who want it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from megamoe.data.corpus import Corpus, ReadStats
from megamoe.data.tokenizer import MASK_PIECE, kind_of, load_tokenizer, tokenizer_identity, vocab_size
from megamoe.utils import make_directory

# Fixed special ids: pad 0, unk 1, bos 2, eos 3 (the end-of-document token).
SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")
"""The pieces of those ids in a trained Hugging Face tokenizer (sentencepiece's own names)."""
LOSSLESS_SENTENCEPIECE = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False,
                          "add_dummy_prefix": False, "allow_whitespace_only_pieces": True}
"""Sentencepiece options that keep every character: no normalisation, whitespace kept as it is (runs of spaces
may be pieces: indentation), no space added in front (decode would drop a leading one)."""


class Staging:
    """Outputs written under hidden temporary names beside their final ones and renamed into place (each rename
    atomic) when the `with` block succeeds, or deleted when it fails: a failed or interrupted run leaves the files
    that were there before (an existing dataset, its tokenizer) as they were."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []

    def path(self, final: str | Path) -> str:
        """The temporary name to write `final` under."""
        final = Path(final)
        make_directory(final.parent)
        temporary = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
        self.pairs.append((temporary, final))
        return str(temporary)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            for temporary, final in self.pairs:
                os.replace(temporary, final)
        else:
            for temporary, _ in self.pairs:
                temporary.unlink(missing_ok=True)


def train_tokenizer(inputs: Corpus | Sequence[str], model_prefix: str, vocab_size: int, model_type: str = "bpe",
                    special_tokens: tuple[str, ...] = (), byte_fallback: bool = True, staging: Staging | None = None,
                    tokenizer_type: str = "SentencePieceTokenizer", normalize: bool = False) -> str:
    """Train a tokenizer on the documents of `inputs` (every JSON key's); returns its path to use now: the final
    one, or under `staging` (published with the rest of its block) the temporary one.

    SentencePieceTokenizer: `<model_prefix>.model` of `model_type` (bpe, unigram). HuggingFaceTokenizer:
    `<model_prefix>.tokenizer.json`, a byte-level BPE. Ids 0-3 are pad, unk, bos, eos (EOD); `<mask>` and
    `special_tokens` are single pieces never split. Lines that are not text are left out here; encode_corpus counts
    and reports them."""
    if staging is None:
        with Staging() as own:
            staged = train_tokenizer(inputs, model_prefix, vocab_size, model_type, special_tokens, byte_fallback, own,
                                     tokenizer_type, normalize)
            return published_name(staged, own)
    corpus, stats = Corpus.of(inputs), ReadStats()
    lines = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")  # noqa: SIM115 - closed below, unlinked in finally
    try:  # the copy of the corpus goes whatever fails, reading included
        with lines:
            for doc in corpus.texts(stats):
                lines.write(_training_lines(doc, normalize))
        stats.require_text(list(corpus.inputs))
        if stats.documents == 0:
            raise ValueError(f"no documents to train the tokenizer on in {list(corpus.inputs)} (empty or blank"
                             + (f"; skipped: {skipped}" if (skipped := stats.skipped_summary()) else "") + ")")
        if tokenizer_type == "HuggingFaceTokenizer":
            model = staging.path(model_prefix + ".tokenizer.json")
            _train_byte_level_bpe(lines.name, model, vocab_size, special_tokens)
            return model
        model = staging.path(model_prefix + ".model")
        staging.path(model_prefix + ".vocab")  # sentencepiece writes it beside the model, under the same stem
        _train_sentencepiece(lines.name, model.removesuffix(".model"), vocab_size, model_type, byte_fallback,
                             special_tokens, normalize)
    finally:
        os.unlink(lines.name)
    return model


def published_name(staged: str, staging: Staging) -> str:
    """The published name of a file written under `staging`."""
    return str(next(final for temporary, final in staging.pairs if str(temporary) == staged))


def _training_lines(doc: str, normalize: bool) -> str:
    """Sentencepiece reads one sentence per line: a document's lines train separately (line breaks themselves are
    spelled as bytes), keeping each line's indentation; normalised training joins them with spaces (as before)."""
    if normalize:
        return doc.replace("\n", " ") + "\n"
    return "".join(line + "\n" for line in doc.split("\n") if line.strip())


def _train_sentencepiece(corpus: str, model_prefix: str, vocab_size: int, model_type: str, byte_fallback: bool,
                         special_tokens: tuple[str, ...], normalize: bool) -> None:
    if not normalize and not byte_fallback:
        raise ValueError("a lossless sentencepiece tokenizer needs byte fallback (characters it has no piece for are "
                         "spelled as bytes); drop --no-byte-fallback, or pass --normalize for a lossy one")
    try:
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=model_prefix, vocab_size=vocab_size,
                                       model_type=model_type, character_coverage=1.0, byte_fallback=byte_fallback,
                                       user_defined_symbols=[MASK_PIECE, *special_tokens], minloglevel=2,
                                       **SPECIAL_IDS, **({} if normalize else LOSSLESS_SENTENCEPIECE))
    except RuntimeError as err:  # sentencepiece reports a bad size as "Internal: ... <= N."
        if limit := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(err)):
            raise ValueError(f"--vocab-size {vocab_size} is too large for this corpus: sentencepiece can make at "
                             f"most {limit[1]} pieces of it; use --vocab-size {limit[1]} or less, or more "
                             "text") from None
        raise ValueError(f"sentencepiece could not train a {vocab_size}-piece {model_type} tokenizer: "
                         f"{str(err).splitlines()[0]}") from None


def _train_byte_level_bpe(corpus: str, path: str, vocab_size: int, special_tokens: tuple[str, ...]) -> None:
    """A byte-level BPE (GPT-2's scheme, as Llama 3 and Qwen use) through the `tokenizers` library: every text is
    its bytes, so nothing is ever unknown or lost; pieces never cross the pre-tokenizer's word boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [*SPECIAL_PIECES, MASK_PIECE, *special_tokens]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: it needs the {len(alphabet)} "
                         f"bytes and {len(specials)} special tokens; use at least {len(specials) + len(alphabet) + 1}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train([corpus], trainer)
    tokenizer.save(path)


@dataclass
class EncodeReport:
    prefixes: tuple[str, ...]
    """One dataset per JSON key, in --json-keys order."""
    documents: int
    tokens: int
    """All datasets' together."""
    seconds: float
    stats: ReadStats
    meta_symbol_documents: int = 0
    """Documents holding U+2581, which a sentencepiece tokenizer decodes as a space (not lossless for them)."""

    @property
    def prefix(self) -> str:
        return self.prefixes[0]

    @property
    def skipped_lines(self) -> int:
        """Input lines that were not UTF-8 (skipped)."""
        return self.stats.skipped_lines

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


_WORKER_TOKENIZER = None
_WORKER_APPEND_EOD = True


def _load_worker_tokenizer(tokenizer_model: str, tokenizer_type: str, append_eod: bool) -> None:
    global _WORKER_TOKENIZER, _WORKER_APPEND_EOD
    _WORKER_TOKENIZER, _WORKER_APPEND_EOD = load_tokenizer(tokenizer_model, tokenizer_type), append_eod


def _encode_batch(records: list[dict[str, str]]) -> list[list[list[int]]]:
    """Per record, per key (in order), the token ids."""
    tokenizer, eod = _WORKER_TOKENIZER, [_WORKER_TOKENIZER.eod] if _WORKER_APPEND_EOD else []
    return [[tokenizer.tokenize(text) + eod for text in record.values()] for record in records]


def _batches(records: Iterator[dict[str, str]], size: int) -> Iterator[list[dict[str, str]]]:
    batch: list[dict[str, str]] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_corpus(inputs: Corpus | Sequence[str], tokenizer_model: str, output_prefix: str, workers: int = 1,
                  batch_documents: int = 256, progress: bool = False, staging: Staging | None = None,
                  tokenizer_name: str | None = None, tokenizer_type: str = "SentencePieceTokenizer",
                  append_eod: bool = True) -> EncodeReport:
    """Tokenize every document into `<output_prefix>_<json_key>_document`, one dataset per JSON key, in input order;
    the end-of-document token appended (`append_eod`; without it, documents that tokenize to nothing are left out,
    as Megatron-LM does).

    `workers` processes tokenize batches of `batch_documents` documents while this one writes them (Megatron's
    IndexedDatasetBuilder); `progress` shows a bar (documents done, tokens/s) on stderr. The files appear only
    when complete (Staging; under the caller's `staging`, with the rest of its block); `tokenizer_name` is the
    path recorded for the tokenizer (default: `tokenizer_model`).
    """
    corpus = Corpus.of(inputs)
    if staging is None:
        with Staging() as own:
            return encode_corpus(corpus, tokenizer_model, output_prefix, workers, batch_documents, progress, own,
                                 tokenizer_name, tokenizer_type, append_eod)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megamoe.data.checks import bin_stamp, sidecar_path

    start = time.perf_counter()
    prefixes = tuple(f"{output_prefix}_{key}_document" for key in corpus.json_keys)
    dtype = np.uint16 if vocab_size(tokenizer_model, tokenizer_type) < 65_536 else np.int32
    outputs = [(staging.path(prefix + ".bin"), staging.path(prefix + ".idx"), staging.path(sidecar_path(prefix)))
               for prefix in prefixes]
    builders = [IndexedDatasetBuilder(bin_path, dtype=dtype) for bin_path, _, _ in outputs]
    stats, written = ReadStats(), [Written() for _ in prefixes]
    records, meta_symbol = corpus.records(stats), [0]
    if tokenizer_type == "SentencePieceTokenizer":
        records = _counting_meta_symbol(records, meta_symbol)
    with _tokenized(_batches(records, batch_documents), tokenizer_model, tokenizer_type, workers,
                    append_eod) as encoded, _progress_bar(progress) as bar:
        for records_ids in encoded:
            for per_key in records_ids:
                for builder, counts, ids in zip(builders, written, per_key, strict=True):
                    if ids:
                        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                        counts.add(ids)
            bar.update(len(records_ids))
            tokens = sum(w.tokens for w in written)
            bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):,.0f}", refresh=False)
    stats.require_text(list(corpus.inputs))
    if any(w.documents == 0 for w in written):
        skipped = f"; skipped: {summary}" if (summary := stats.skipped_summary()) else ""
        raise ValueError(f"no documents in {list(corpus.inputs)} (empty, or every line blank{skipped}): nothing to "
                         "write")
    identity = tokenizer_identity(tokenizer_model, tokenizer_type)
    for builder, counts, (bin_path, idx_path, sidecar) in zip(builders, written, outputs, strict=True):
        builder.finalize(idx_path)
        meta = {**identity, "tokenizer_model": str(tokenizer_name or tokenizer_model), "append_eod": append_eod,
                "documents": counts.documents, "tokens": counts.tokens, "min_id": counts.min_id,
                "max_id": counts.max_id, **bin_stamp(Path(bin_path)), "skipped_lines": stats.skipped_lines,
                "first_skipped": stats.first_skipped, "skipped_files": dict(stats.skipped_files)}
        Path(sidecar).write_text(json.dumps(meta, indent=1))  # start-up refuses another tokenizer (data/checks.py)
    return EncodeReport(prefixes=prefixes, documents=stats.documents, tokens=sum(w.tokens for w in written),
                        seconds=time.perf_counter() - start, stats=stats, meta_symbol_documents=meta_symbol[0])


SENTENCEPIECE_SPACE = "\u2581"
"""U+2581 (LOWER ONE EIGHTH BLOCK): sentencepiece writes spaces as this symbol, so the symbol itself in a text
decodes as a space."""


def _counting_meta_symbol(records: Iterator[dict[str, str]], count: list[int]) -> Iterator[dict[str, str]]:
    for record in records:
        count[0] += any(SENTENCEPIECE_SPACE in text for text in record.values())
        yield record


@dataclass
class Written:
    """Counts and id range of the documents written (recorded in the sidecar: start-up trusts them for this .bin
    instead of scanning it)."""

    documents: int = 0
    tokens: int = 0
    min_id: int = 0
    max_id: int = 0

    def add(self, ids: list[int]) -> None:
        low, high = min(ids), max(ids)
        self.min_id, self.max_id = (low, high) if not self.documents else (min(self.min_id, low),
                                                                           max(self.max_id, high))
        self.documents, self.tokens = self.documents + 1, self.tokens + len(ids)


@contextlib.contextmanager
def _tokenized(batches: Iterator[list[dict[str, str]]], tokenizer_model: str, tokenizer_type: str, workers: int,
               append_eod: bool):
    """Token ids per batch, in order: in this process (workers=1) or a pool of `workers` processes."""
    if workers <= 1:
        _load_worker_tokenizer(tokenizer_model, tokenizer_type, append_eod)
        yield map(_encode_batch, batches)
        return
    # fork where there is one: the workers inherit the loaded tokenizer instead of importing megatron again
    # (seconds each); nothing in this process has started threads yet (no torch op has run).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":
        _load_worker_tokenizer(tokenizer_model, tokenizer_type, append_eod)
    initializer, initargs = ((None, ()) if method == "fork"
                             else (_load_worker_tokenizer, (tokenizer_model, tokenizer_type, append_eod)))
    with multiprocessing.get_context(method).Pool(workers, initializer, initargs) as pool:
        yield pool.imap(_encode_batch, batches, chunksize=1)


def _progress_bar(enabled: bool):
    from tqdm import tqdm  # a DeepSpeed dependency

    return tqdm(disable=not enabled, unit=" docs", desc="tokenizing", mininterval=1.0)


def describe_dataset(prefix: str, tokenizer_model: str | None = None, sample: int = 0,
                     sample_tokens: int = 64) -> dict:
    """Documents, tokens and document lengths of an indexed dataset (read by megatron-core's IndexedDataset),
    with document `sample`'s first `sample_tokens` ids, decoded when a tokenizer (either kind) is given."""
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
        out["sample_text"] = load_tokenizer(tokenizer_model, kind_of(tokenizer_model)).detokenize(ids)
    return out
