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

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.utils import file_sha256

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


def staging_dir(save_dir: str | Path, tag: str) -> Path:
    return Path(save_dir) / PARTIAL / tag


def publish(save_dir: str | Path, tag: str, keep_last: int | None) -> Path:
    """Manifest, rename into place, `latest`, pruning. Collective: every rank calls it after writing its files."""
    staging = staging_dir(save_dir, tag)
    _barrier()  # every rank's files are complete
    write_manifest(staging)
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
    _barrier()
    return final


def begin(save_dir: str | Path, tag: str) -> Path:
    """A clean staging directory for `tag`; whatever killed saves left in .partial goes (one save at a time).
    Collective."""
    staging = staging_dir(save_dir, tag)
    if _rank() == 0:
        shutil.rmtree(staging.parent, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    return staging


def write_manifest(directory: Path) -> None:
    """Size and SHA-256 of every file, each rank hashing a share; rank 0 writes the manifest. Collective."""
    # One listing, rank 0's: on a shared file system with client caching, ranks' listings may differ.
    files = [sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                    if p.is_file() and p.name != MANIFEST) if _rank() == 0 else None]
    if _world() > 1:
        dist.broadcast_object_list(files, src=0)
    mine = {name: _describe(directory / name) for name in files[0][_rank()::_world()]}
    parts = [mine]
    if _world() > 1:
        parts = [None] * _world()
        dist.all_gather_object(parts, mine)
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
    entries = json.loads(manifest.read_text())["files"]
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


def load_trusted(path: Path) -> dict:
    """torch.load of a checkpoint file without executing code (DeepSpeed's state classes allowed)."""
    import importlib

    classes = []
    for qualified in DEEPSPEED_STATE_CLASSES:
        module, _, name = qualified.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    with torch.serialization.safe_globals(classes):
        return torch.load(path, weights_only=True, map_location="cpu")


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


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
