"""Checkpoints that are published whole, verified before use, and loaded without running code.

Publishing: every rank writes into `<save>/.partial/<tag>/`; once all have finished, the manifest (size and
SHA-256 of every file, hashed by all ranks in parallel) is written, the directory is renamed to `<save>/<tag>`
(one atomic rename on the same file system) and `latest` is replaced atomically (write, fsync, rename). A run
killed at any point leaves `latest` naming the previous complete checkpoint; `.partial` leftovers are removed by
the next save. Keep-last-N pruning follows the publication. (Saving a step that is already published, e.g. a
rerun, swaps the directories by two renames: only a kill between those two leaves that tag absent.)

Verification before resuming (checkpoint.verify): the manifest's sizes (and hashes) against the files, with an
error naming the first bad file. Safety: DeepSpeed's own loader unpickles with weights_only=False, so before it
runs every .pt file is scanned (torch.serialization.get_unsafe_globals_in_checkpoint reads the pickle without
executing it): besides tensors and containers only DeepSpeed's plain state classes may appear; megamoe's own
reads use weights_only=True.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import yaml

from megamoe.utils import file_sha256

T = TypeVar("T")
MANIFEST = "manifest.json"
PARTIAL = ".partial"
DEEPSPEED_STATE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)
"""The non-tensor classes DeepSpeed's own checkpoint files hold: data (loss scale, partition offsets, an enum)."""


class CheckpointError(RuntimeError):
    """A checkpoint that must not be used: incomplete, corrupt, or holding code."""


TAG_PATTERN = re.compile(r"iter_\d{7}")


def checkpoint_tags(directory: Path) -> list[str]:
    """The iteration checkpoints (tag directories) published in `directory`, oldest first."""
    return sorted(p.name for p in directory.glob("iter_*") if p.is_dir() and TAG_PATTERN.fullmatch(p.name))


def holds_checkpoints(directory: Path) -> bool:
    """Whether `directory` holds a run's checkpoints (a 'latest' or a published tag)."""
    return directory.is_dir() and ((directory / "latest").exists() or bool(checkpoint_tags(directory)))


def find_checkpoint(load_dir: str | Path, new_run_ok: bool) -> Path | None:
    """The tag directory `<load_dir>/latest` names. None only when `new_run_ok` and `load_dir` holds no checkpoint
    at all (the first start of a job whose checkpoint.load and checkpoint.save are one directory); CheckpointError,
    naming what to pass instead, for anything else: resuming is what the user asked for."""
    load = Path(load_dir)
    if not holds_checkpoints(load):
        if problem := _not_a_run_directory(load):
            raise CheckpointError(problem)
        if new_run_ok:
            return None
        what = "does not exist" if not load.exists() else "holds no checkpoint ('latest' missing)"
        raise CheckpointError(f"checkpoint.load={load_dir} {what}; pass the directory a run saved its "
                              "checkpoints in (its checkpoint.save)")
    tags = checkpoint_tags(load)
    latest = load / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{load} holds checkpoints {_tag_range(tags)} but no 'latest' file naming the one to "
                              f"resume from; write it, e.g. echo {tags[-1]} > {latest}")
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        tag = None
    if not tag or "/" in tag or tag in (".", "..") or not (load / tag).is_dir():
        named = "is empty" if tag == "" else ("is not text" if tag is None else f"names {tag!r}, which is not a "
                                                                                "checkpoint directory in it")
        fix = f"write the tag to resume from into it, e.g. {tags[-1]}" if tags else "no checkpoint is published here"
        raise CheckpointError(f"{latest} {named}; {fix}")
    return load / tag


def _not_a_run_directory(path: Path) -> str | None:
    """Why `path` is something else than a run's checkpoint directory (a tag, an HF export), or None."""
    if (path / MANIFEST).is_file() or list(path.glob("mp_rank_*_model_states.pt")):
        if holds_checkpoints(path.parent):
            return (f"checkpoint.load={path} is one checkpoint of a run, not its checkpoint directory: pass "
                    f"checkpoint.load={path.parent} (its 'latest' names {latest_name(path.parent)}), or write "
                    f"{path.name} into {path.parent / 'latest'} to resume from this one")
        return f"checkpoint.load={path} is one checkpoint, not a run's checkpoint directory: pass its parent"
    if (path / "config.json").is_file() and list(path.glob("*.safetensors")):
        return (f"checkpoint.load={path} is a Hugging Face model directory; import it first: python "
                f"tools/convert_checkpoint.py --load-hf {path} --save <dir> --config <yaml>")
    return None


def latest_name(directory: Path) -> str:
    """What `<directory>/latest` says, for messages."""
    try:
        return (directory / "latest").read_text(encoding="utf-8").strip() or "nothing"
    except (OSError, UnicodeDecodeError):
        return "nothing readable"


def _tag_range(tags: list[str]) -> str:
    return tags[0] if len(tags) == 1 else f"{tags[0]} .. {tags[-1]}"


def same_directory(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def read_json(path: Path) -> dict | None:
    """A small JSON record of a checkpoint (None if absent; CheckpointError if damaged)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not JSON: the checkpoint is damaged; resume from another one") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} holds no record: the checkpoint is damaged; resume from another one")
    return record


TOKENIZER_RECORD = "tokenizer.meta.json"
"""In every checkpoint: the tokenizer (path, SHA-256, size) the model's embedding rows belong to."""
WEIGHTS_ONLY_MARKER = "weights_only"
"""A file in checkpoints written without optimizer state (imports, upcycling): they load as fine-tuning."""


def is_weights_only(tag_dir: Path) -> bool:
    return (tag_dir / WEIGHTS_ONLY_MARKER).is_file()


def read_saved_config(tag_dir: Path) -> dict:
    """The checkpoint's config.yaml as parsed YAML (CheckpointError if missing or unreadable)."""
    path = tag_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (its layout and model are "
                              "recorded there); resume from another checkpoint") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}): the checkpoint is damaged; resume "
                              "from another checkpoint") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} holds no config: the checkpoint is damaged")
    return saved


def config_changes(tag_dir: Path, resolved: str, keys: tuple[str, ...]) -> list[str]:
    """'key saved -> now' for each config key under `keys` (sections like 'model', or keys like 'train.lr') where
    the checkpoint's config.yaml and `resolved` (config.dump of this run's) differ."""
    saved, now = _flat(read_saved_config(tag_dir)), _flat(yaml.safe_load(resolved))
    return [f"{key} {saved.get(key)} -> {now.get(key)}" for key in sorted(saved.keys() | now.keys())
            if any(key == k or key.startswith(f"{k}.") for k in keys) and saved.get(key) != now.get(key)]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:  # sections, not mapping-valued keys (deepspeed.extra)
            out.update(_flat(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def require_new_directory(save_dir: str | Path, what: str) -> None:
    """CheckpointError if `save_dir` already holds a run's checkpoints, which writing `what` there would replace."""
    save = Path(save_dir)
    if save.exists() and not save.is_dir():
        raise CheckpointError(f"{what}: {save} is a file; give a directory")
    if holds_checkpoints(save):
        raise CheckpointError(f"{what}: {save} already holds checkpoints (latest {latest_name(save)}), which this "
                              "would replace; choose a new directory")


def staging_dir(save_dir: str | Path, tag: str) -> Path:
    return Path(save_dir) / PARTIAL / tag


def publish(save_dir: str | Path, tag: str, keep_last: int | None, group: dist.ProcessGroup | None = None) -> Path:
    """Manifest, rename into place, `latest`, pruning. Collective over `group` (default: all ranks; an asynchronous
    save passes its own): every rank calls it after writing its files."""
    staging = staging_dir(save_dir, tag)
    _barrier(group)  # every rank's files are complete
    write_manifest(staging, group)
    final = Path(save_dir) / tag
    if _rank() == 0:
        replaced = staging.with_name(f"{tag}.replaced")
        if final.exists():  # the same step saved again (a rerun): the new one replaces it
            os.replace(final, replaced)
        os.replace(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
        write_atomically(Path(save_dir) / "latest", tag)
        if keep_last is not None:
            prune(Path(save_dir), keep_last, keep=tag)
    _barrier(group)
    return final


@contextlib.contextmanager
def writing(staging: Path, iteration: int):
    """Around the writes of a checkpoint into `staging`: a failure (a full disk, above all) becomes one
    CheckpointError saying what happened, and the staging directory goes (a full disk keeps nothing of a save
    that cannot finish); `latest` still names the previous checkpoint."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - torch.save's C++ writer reports a full disk as a RuntimeError
        shutil.rmtree(staging, ignore_errors=True)
        save_dir = staging.parent.parent
        kept = f"'latest' still names {latest_name(save_dir)}" if (save_dir / "latest").is_file() else \
            "no earlier checkpoint exists"
        if _no_space(err, save_dir):
            raise CheckpointError(f"no space left on the file system of {save_dir} while saving step {iteration} "
                                  f"({shutil.disk_usage(save_dir).free:,} bytes free): the checkpoint was not written "
                                  f"and its partial files were removed; {kept}. Free space (or set checkpoint.save "
                                  "elsewhere) and resume") from None
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(f"saving step {iteration} into {save_dir} failed ({type(err).__name__}: {reason}); its "
                              f"partial files were removed and {kept}") from None


def _no_space(err: BaseException, directory: Path) -> bool:
    """Whether `err` (or what caused it) is a full disk or quota."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err):
            return True
        # How torch.save's writer reports a short write:
        if any(text in str(err) for text in ("iostream error", "failed writing file", "unexpected pos")):
            return shutil.disk_usage(directory).free < 64 << 20
        err = err.__cause__ or err.__context__
    return False


def begin(save_dir: str | Path, tag: str) -> Path:
    """A clean staging directory for `tag`; whatever killed saves left in .partial goes (one save at a time).
    Collective."""
    staging = staging_dir(save_dir, tag)
    if _rank() == 0:
        shutil.rmtree(staging.parent, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    return staging


def write_manifest(directory: Path, group: dist.ProcessGroup | None = None) -> None:
    """Size and SHA-256 of every file, each rank hashing a share; rank 0 writes the manifest. Collective over
    `group` (all ranks)."""
    # One listing, rank 0's: on a shared file system with client caching, ranks' listings may differ.
    files = [sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                    if p.is_file() and p.name != MANIFEST) if _rank() == 0 else None]
    if _world() > 1:
        dist.broadcast_object_list(files, src=0, group=group)
    mine = {name: _describe(directory / name) for name in files[0][_rank()::_world()]}
    parts = [mine]
    if _world() > 1:
        parts = [None] * _world()
        dist.all_gather_object(parts, mine, group=group)
    if _rank() == 0:
        entries = {name: part[name] for part in parts for name in part}
        write_atomically(directory / MANIFEST, json.dumps({"files": dict(sorted(entries.items()))}, indent=1))


def _describe(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def verify(directory: Path, mode: str) -> None:
    """CheckpointError naming the first file that is missing, of the wrong size or (mode 'hashes') content.
    Collective when distributed: the ranks share the hashing and agree on the verdict."""
    if mode == "none":
        return
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: it was not published completely (or predates "
                              "megamoe's manifests); resume from another checkpoint or set checkpoint.verify=none")
    record = read_json(manifest)
    entries = record.get("files") if record is not None else None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{manifest} lists no files: the checkpoint is damaged; resume from another one")
    problems = _shared_checks(sorted(entries), lambda name: _check_file(directory / name, entries[name], mode))
    if problems:
        raise CheckpointError(f"{problems[0]}; this checkpoint is damaged: resume from an earlier one (point "
                              f"'latest' in {directory.parent} at it)")


def _check_file(path: Path, entry: dict, mode: str) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    if (size := path.stat().st_size) != entry["bytes"]:
        return f"{path} has {size} bytes, the manifest {entry['bytes']} (truncated or rewritten)"
    if mode == "hashes" and file_sha256(path) != entry["sha256"]:
        return f"{path} does not match its SHA-256 in the manifest (corrupted)"
    return None


def on_every_rank(check: Callable[[], T], group: dist.ProcessGroup | None = None) -> T:
    """`check()` on this rank; if it raised a CheckpointError on any rank, every rank raises the first one (by
    rank): a problem only some ranks see (the shard of their experts is gone) ends them all with the same line,
    instead of leaving the others to die in the next collective. Collective over `group` (all ranks) when
    distributed; `check` must hold none, or only collectives that fail on every rank alike."""
    try:
        result, error = check(), None
    except CheckpointError as err:
        result, error = None, err
    if _world() > 1:
        errors = [None] * _world()
        dist.all_gather_object(errors, error, group=group)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
    return result


def _shared_checks(names: list[str], check) -> list[str]:
    """check(name) -> a problem or None, over `names` shared among the ranks; every rank gets all problems,
    sorted. Collective when distributed."""
    problems = [problem for name in names[_rank()::_world()] if (problem := check(name))]
    if _world() > 1:
        gathered = [None] * _world()
        dist.all_gather_object(gathered, problems)
        problems = sorted(p for part in gathered for p in part)
    return problems


def check_loadable(directory: Path) -> None:
    """CheckpointError if a .pt file of `directory` would run code when unpickled (globals beyond tensors,
    containers and DeepSpeed's state classes). Reads the pickles without executing them; the ranks share
    the files. Collective when distributed."""
    if problems := _shared_checks(sorted(p.name for p in directory.glob("*.pt")),
                                  lambda name: _unsafe_globals(directory / name)):
        raise CheckpointError(problems[0])


def _unsafe_globals(path: Path) -> str | None:
    if unsafe := sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
                        - set(DEEPSPEED_STATE_CLASSES)):
        return (f"{path} refers to {unsafe[:3]}: loading it could run code; megamoe loads only checkpoints "
                "holding tensors and DeepSpeed's state")
    return None


def load_trusted(path: Path, mmap: bool = False) -> dict:
    """torch.load of a checkpoint file without executing code (DeepSpeed's state classes allowed); `mmap`: tensors
    are read from the file when touched."""
    import importlib

    classes = []
    for qualified in DEEPSPEED_STATE_CLASSES:
        module, _, name = qualified.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    with torch.serialization.safe_globals(classes):
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune(save_dir: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` iteration checkpoints (never `keep`)."""
    tags = sorted(p.name for p in save_dir.glob("iter_*") if p.is_dir())
    for tag in tags[:-keep_last]:
        if tag != keep:
            shutil.rmtree(save_dir / tag, ignore_errors=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=group)


class ReadMeter:
    """Bytes this process reads inside its `with` blocks, summed over them: Linux's count of bytes its read calls
    returned (/proc/self/io `rchar`: files whether cached or not, and sockets read with read(), so collectives
    inside count too: an upper bound on the file bytes). `total` is None where the OS does not say."""

    PROC_IO = Path("/proc/self/io")

    def __init__(self) -> None:
        self.total: int | None = 0 if self.PROC_IO.is_file() else None
        self._start: int | None = None

    @classmethod
    def _rchar(cls) -> int:
        for line in cls.PROC_IO.read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        raise OSError(f"{cls.PROC_IO} has no rchar line")

    def __enter__(self) -> ReadMeter:
        if self.total is not None:
            self._start = self._rchar()
        return self

    def __exit__(self, *exc) -> None:
        if self.total is not None and self._start is not None:
            self.total += self._rchar() - self._start

