"""A corpus of several domains (code, prose, ...) with a held-out split per domain, for studies that evaluate each
domain on its own (tools/build_corpus.py).

Every domain's documents are read (megamoe/data/corpus.py: a directory's files or a file's lines), exact duplicates
removed across all domains (the same bytes, by SHA-256; the first copy read is kept), and each document sent to
the training or the held-out split by a hash of its text: the split is by document, never by token offset, and
the same for any order or number of inputs. The tokenizer is trained on the training splits only (a held-out
document's pieces are never fitted to it). Outputs, published together (a failed run leaves nothing behind):

  <out>/corpus.tokenizer.json (or corpus.model)
  <out>/<domain>_train_text_document.{bin,idx}    -> data.data_path (a blend of the domains)
  <out>/<domain>_held_out_text_document.{bin,idx} -> data.valid_data_path (valid/<domain>_held_out/loss)
  <out>/corpus.json                               documents, bytes and tokens per domain and split, duplicates
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megamoe.data import preprocess
from megamoe.data.corpus import Corpus, ReadStats

SPLITS = ("train", "held_out")
MANIFEST = "corpus.json"


@dataclass(frozen=True)
class Domain:
    name: str
    corpus: Corpus


@dataclass
class SplitStats:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    prefix: str = ""


@dataclass
class DomainStats:
    sources: list[str]
    splits: dict[str, SplitStats] = field(default_factory=lambda: {s: SplitStats() for s in SPLITS})
    duplicates: int = 0
    """Documents left out as exact copies of one read before (in this domain or an earlier one)."""
    skipped_files: dict[str, int] = field(default_factory=dict)
    """A directory's files left out, per reason (too large, not UTF-8, ...), duplicates included."""


def held_out_by_hash(text: str, share: float) -> bool:
    """Whether a document goes to the held-out split: a fixed function of its text (a uniform draw from its
    SHA-256), so each document lands in the same split whatever else the corpus holds."""
    draw = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return draw < share


def build(domains: list[Domain], out_dir: str | Path, held_out: float, vocab_size: int,
          tokenizer_type: str = "HuggingFaceTokenizer", workers: int = 1) -> dict:
    """Split, tokenize and write every domain (see the module's docstring); returns the manifest it wrote."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held-out share {held_out} must be between 0 and 1")
    if len({d.name for d in domains}) != len(domains) or not domains:
        raise ValueError(f"domain names {[d.name for d in domains]} must be given and differ")
    out = Path(out_dir)
    stats = {d.name: DomainStats(sources=list(d.corpus.inputs)) for d in domains}
    with tempfile.TemporaryDirectory(prefix="domains-") as scratch, preprocess.Staging() as staging:
        texts = _write_splits(domains, Path(scratch), held_out, stats)
        model = preprocess.train_tokenizer(Corpus(tuple(str(texts[d.name, "train"]) for d in domains)),
                                           str(out / "corpus"), vocab_size, staging=staging,
                                           tokenizer_type=tokenizer_type)
        published = preprocess.published_name(model, staging)
        for domain in domains:
            for split in SPLITS:
                report = preprocess.encode_corpus(
                    [str(texts[domain.name, split])], model, str(out / f"{domain.name}_{split}"), workers=workers,
                    staging=staging, tokenizer_name=published, tokenizer_type=tokenizer_type)
                stats[domain.name].splits[split].tokens = report.tokens
                stats[domain.name].splits[split].prefix = str(out / f"{domain.name}_{split}_text_document")
        manifest = {"held_out": held_out, "vocab_size": vocab_size, "tokenizer_type": tokenizer_type,
                    "tokenizer_model": published, "domains": {name: asdict(s) for name, s in stats.items()}}
        with open(staging.path(out / MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def _write_splits(domains: list[Domain], scratch: Path, held_out: float,
                  stats: dict[str, DomainStats]) -> dict[tuple[str, str], Path]:
    """Each domain's documents as <domain>.<split>.jsonl under `scratch` (one {"text": ...} per line)."""
    seen: set[bytes] = set()
    paths = {(d.name, split): scratch / f"{d.name}.{split}.jsonl" for d in domains for split in SPLITS}
    for domain in domains:
        read = ReadStats()
        with contextlib.ExitStack() as stack:
            files = {split: stack.enter_context(open(paths[domain.name, split], "w", encoding="utf-8"))
                     for split in SPLITS}
            for text in _unique(domain.corpus.texts(read), seen, stats[domain.name]):
                split = "held_out" if held_out_by_hash(text, held_out) else "train"
                files[split].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                stats[domain.name].splits[split].documents += 1
                stats[domain.name].splits[split].bytes += len(text.encode("utf-8"))
        stats[domain.name].duplicates += read.skipped_files.get("duplicate", 0)
        stats[domain.name].skipped_files = dict(read.skipped_files)
        for split in SPLITS:
            if stats[domain.name].splits[split].documents == 0:
                raise ValueError(f"domain '{domain.name}' ({', '.join(domain.corpus.inputs)}) has no {split} "
                                 "document: give it more documents or another held-out share")
    return paths


def _unique(texts: Iterator[str], seen: set[bytes], stats: DomainStats) -> Iterator[str]:
    """The texts not read before, in any domain (a directory's own duplicates are already left out by Corpus)."""
    for text in texts:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            stats.duplicates += 1
            continue
        seen.add(digest)
        yield text


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build the corpus first (tools/build_corpus.py)")
    return json.loads(path.read_text())


def summary(manifest: dict) -> list[str]:
    """A markdown table of documents, bytes and tokens per domain and split, and what was left out."""
    lines = ["| domain | split | documents | MB | tokens | bytes/token |", "|---|---|---|---|---|---|"]
    for name, domain in manifest["domains"].items():
        for split, s in domain["splits"].items():
            lines.append(f"| {name} | {split} | {s['documents']:,} | {s['bytes'] / 1e6:,.1f} | {s['tokens']:,} | "
                         f"{s['bytes'] / max(s['tokens'], 1):.2f} |")
    for name, domain in manifest["domains"].items():
        skipped = ", ".join(f"{n:,} {reason}" for reason, n in sorted(domain["skipped_files"].items()))
        lines.append(f"\n{name}: {domain['duplicates']:,} exact duplicates removed"
                     + (f"; files left out: {skipped}" if skipped else "") + f" (from {', '.join(domain['sources'])})")
    return lines


def source_directory_of_environment() -> str:
    """This Python environment's site-packages (its installed packages' sources)."""
    import sysconfig

    return os.path.realpath(sysconfig.get_paths()["purelib"])
