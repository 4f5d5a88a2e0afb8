"""What a corpus is made of: documents read from files (.jsonl, .jsonl.gz, .txt) and from directory trees.

A .jsonl line is one document per JSON key asked for (Megatron-LM's `--json-keys`: one dataset per key); a .txt
line is one document. A directory is a tree of text or source files, each file one document kept byte for byte
(multi-line, indentation, line ends): the files whose name or relative path matches an include pattern, walked in
sorted order, hidden entries (.git, .venv, ...) below the given directory left out. A file is skipped, and counted
under its reason, when it is over the size limit, not UTF-8, binary (NUL bytes), empty, unreadable, not a regular
file (a broken link, a FIFO), or an exact duplicate (same bytes, by SHA-256) of a file read before it, in any of the
directories given.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_FILE_BYTES = 1 << 20
"""Files of a directory larger than this are skipped (generated tables, minified bundles, data dumps)."""


@dataclass
class ReadStats:
    """What reading kept and skipped. Lines that are not text (not UTF-8, or holding NUL bytes) are reported, never
    silently mangled, and a file made mostly of them is refused (require_text); files of a directory skipped are
    counted per reason with the first example of each."""

    documents: int = 0
    skipped_lines: int = 0
    first_skipped: str = ""
    """path:line of the first one."""
    files_kept: int = 0
    skipped_files: Counter = field(default_factory=Counter)
    """reason -> number of files of a directory left out."""
    first_skipped_file: dict[str, str] = field(default_factory=dict)
    """reason -> the first file left out for it."""

    def require_text(self, inputs: list[str]) -> None:
        """ValueError when at least as many lines were skipped as kept: a binary file, not a corpus."""
        if self.skipped_lines and self.skipped_lines >= self.documents:
            raise ValueError(f"{self.skipped_lines} lines of {', '.join(map(str, inputs))} are not text (not UTF-8 or "
                             f"holding NUL bytes, the first at {self.first_skipped}) against {self.documents} that "
                             "are: this is not a text corpus (a binary file?)")

    def skip_file(self, path: Path, reason: str) -> None:
        self.skipped_files[reason] += 1
        self.first_skipped_file.setdefault(reason, str(path))

    def skipped_summary(self) -> str:
        """'3 duplicate (first: a/b.py), 1 too large (first: c.py)', or '' when no file was skipped."""
        return ", ".join(f"{count:,} {reason} (first: {self.first_skipped_file[reason]})"
                         for reason, count in sorted(self.skipped_files.items()))


@dataclass(frozen=True)
class Corpus:
    """The inputs of one preprocessing run and how to read them."""

    inputs: tuple[str, ...]
    json_keys: tuple[str, ...] = ("text",)
    include: tuple[str, ...] = ()
    """Patterns (fnmatch: `*.py`, `src/*.md`) a directory's file name or relative path must match; () takes all."""
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    """A directory's files above this size are skipped; 0: no limit."""

    @classmethod
    def of(cls, inputs: Corpus | list[str] | tuple[str, ...] | str) -> Corpus:
        """`inputs` as a Corpus: one already, or files and directories read with the defaults."""
        if isinstance(inputs, Corpus):
            return inputs
        return cls(tuple(map(str, [inputs] if isinstance(inputs, (str, Path)) else inputs)))

    def problem(self) -> str | None:
        """What makes these inputs unusable (one line), checked before anything is read or written; None if fine."""
        if len(set(self.json_keys)) != len(self.json_keys):
            return f"--json-keys {' '.join(self.json_keys)} names a key twice"
        for path in map(Path, self.inputs):
            if not path.exists():
                return f"--input '{path}' does not exist"
            if path.is_file() and len(self.json_keys) > 1 and ".json" not in path.name:
                return (f"--input '{path}' is plain text (one document per line): --json-keys "
                        f"{' '.join(self.json_keys)} selects fields of .jsonl files")
            if path.is_dir():
                if len(self.json_keys) > 1:
                    return (f"--input '{path}' is a directory: its files are documents of one dataset, while "
                            f"--json-keys {' '.join(self.json_keys)} asks for several; give the directory alone, "
                            "with one key")
                if next(self._files(path), None) is None:  # before anything is trained or written
                    patterns = " ".join(self.include) or "*"
                    return f"--input '{path}' holds no file matching --include {patterns} (hidden entries left out)"
        return None

    def records(self, stats: ReadStats) -> Iterator[dict[str, str]]:
        """One record per document, {json key: text}, in input order."""
        seen: set[bytes] = set()  # SHA-256 of the directories' files read so far
        for path in map(Path, self.inputs):
            if path.is_dir():
                yield from ({self.json_keys[0]: text} for text in self._directory_documents(path, stats, seen))
            else:
                yield from read_records(path, self.json_keys, stats)

    def texts(self, stats: ReadStats) -> Iterator[str]:
        """Every document's text of every key (what a tokenizer trains on)."""
        for record in self.records(stats):
            yield from record.values()

    def _files(self, root: Path) -> Iterator[Path]:
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            for name in sorted(names):
                path = Path(directory, name)
                relative = path.relative_to(root).as_posix()
                if not name.startswith(".") and (not self.include or any(
                        fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in self.include)):
                    yield path

    def _directory_documents(self, root: Path, stats: ReadStats, seen: set[bytes]) -> Iterator[str]:
        for path in self._files(root):
            if not path.is_file():  # a broken link, a FIFO (reading one would block), a socket
                stats.skip_file(path, "not a regular file")
                continue
            try:
                if self.max_file_bytes and path.stat().st_size > self.max_file_bytes:
                    stats.skip_file(path, "too large")
                    continue
                data = path.read_bytes()
            except OSError:  # no permission, vanished while walking
                stats.skip_file(path, "unreadable")
                continue
            digest = hashlib.sha256(data).digest()
            if (reason := _file_problem(data, digest in seen)) is not None:
                stats.skip_file(path, reason)
                continue
            seen.add(digest)
            stats.files_kept += 1
            stats.documents += 1
            yield data.decode("utf-8")


def _file_problem(data: bytes, duplicate: bool) -> str | None:
    if duplicate:
        return "duplicate"
    if not data.strip():
        return "empty"
    if b"\0" in data:
        return "binary"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def read_documents(path: str | Path, json_key: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
    """Documents of a .jsonl, .jsonl.gz or .txt (one document per line) file; blank lines skipped, lines that
    are not text skipped and counted in `stats`; a line that is not JSON (in .jsonl) is an error."""
    for record in read_records(Path(path), (json_key,), stats if stats is not None else ReadStats()):
        yield record[json_key]


def read_records(path: Path, json_keys: tuple[str, ...], stats: ReadStats) -> Iterator[dict[str, str]]:
    """read_documents for several JSON keys: {key: text} per line."""
    try:
        yield from _records(path, json_keys, stats)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} cannot be read to the end ({type(err).__name__}: {err}): a damaged or "
                         "truncated file") from None


def _records(path: Path, json_keys: tuple[str, ...], stats: ReadStats) -> Iterator[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    is_json = ".jsonl" in path.name or ".json" in path.name
    if not is_json and len(json_keys) > 1:
        raise ValueError(f"{path} is plain text (one document per line): --json-keys {' '.join(json_keys)} "
                         "applies to .jsonl files")
    with opener(path, "rb") as lines:
        for lineno, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = "\0"
            if "\0" in line:
                stats.skipped_lines += 1
                stats.first_skipped = stats.first_skipped or f"{path}:{lineno}"
                continue
            if not line.strip():
                continue
            stats.documents += 1
            if is_json:
                yield _json_record(line, path, lineno, json_keys)
            else:
                yield {json_keys[0]: line.rstrip("\r\n")}  # Windows line ends too


def _json_record(line: str, path: Path, lineno: int, json_keys: tuple[str, ...]) -> dict[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno} is not JSON ({err.msg}); one JSON object per line, or use a .txt file "
                         "for plain text") from None
    for key in json_keys:
        if not isinstance(record, dict) or key not in record:
            raise ValueError(f"{path}:{lineno} has no '{key}' field; pass --json-keys <field>")
        if not isinstance(record[key], str):
            raise ValueError(f"{path}:{lineno}: '{key}' is {type(record[key]).__name__}, not text")
    return {key: record[key] for key in json_keys}
