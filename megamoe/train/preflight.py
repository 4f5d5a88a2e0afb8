"""Checks of what a run will read and write, before any process group starts: the directories it writes (they
can be created and written), where it resumes from (a checkpoint, of this model and tokenizer) and where it
saves (not over another run's checkpoints), so that a mistake costs a one-line error instead of the steps
trained before it surfaces. Every rank runs them on the same files and reaches the same verdict.

Reads files only (no torch.distributed, no model); the checkpoint layout is integrity.py's.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path

from megamoe.config import ConfigError, ModelConfig, RunConfig, dump
from megamoe.data.tokenizer import tokenizer_identity
from megamoe.train import integrity
from megamoe.train.integrity import CheckpointError
from megamoe.utils import get_logger, global_rank, make_directory, warn_once


def check_run(cfg: RunConfig, data_cache: str) -> Path | None:
    """ConfigError or CheckpointError naming the first problem with the run's directories; returns the checkpoint
    the run will load (None: a new run)."""
    for key, path in (("logging.log_dir", cfg.logging.log_dir), ("checkpoint.save", cfg.checkpoint.save),
                      ("data.data_cache_path", data_cache)):
        if path is not None:
            require_writable_directory(key, path)
    if cfg.checkpoint.save is not None and global_rank() == 0:
        lock_save_directory(cfg.checkpoint.save)
    tag = loaded_checkpoint(cfg)
    require_save_directory(cfg, tag)
    if tag is not None:
        require_same_model(tag, cfg)
        require_same_tokenizer(tag, cfg.data.tokenizer_model, cfg.data.tokenizer_type)
        if not (cfg.checkpoint.finetune or integrity.is_weights_only(tag)):
            report_schedule_changes(tag, cfg)
    return tag


def require_writable_directory(key: str, path: str) -> None:
    """Create `path` (with its parents) and write a file in it: a save that would fail at the first checkpoint,
    after hours of training, fails now."""
    try:
        directory = make_directory(path)
    except OSError as err:
        raise ConfigError(f"{key}={err.strerror}; give a directory that can be") from None
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={path} cannot be written to ({err.strerror or err}); give a writable "
                          "directory") from None


LOCK_FILE = ".lock"
_held_locks: dict[Path, int] = {}
"""Save directories this process has locked (for its lifetime: the kernel releases a lock when its holder ends,
however it ends)."""


def lock_save_directory(save: str) -> None:
    """Rank 0 holds an exclusive lock on `<save>/.lock` while the run lives: a second run started into the same
    directory (a job submitted twice) is refused, instead of interleaving its checkpoints with the first's and
    deleting the files the first is staging. A file system without locks is warned about, not refused."""
    directory = Path(save).resolve()
    if directory in _held_locks:
        return
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
        os.close(fd)
        raise CheckpointError(f"checkpoint.save={save} is in use by another run ({holder}); two runs saving there "
                              "would interleave their checkpoints: wait for it to end, or save elsewhere") from None
    except OSError as err:
        os.close(fd)
        warn_once(f"checkpoint.save={save}: the file system does not lock files ({err.strerror}); nothing stops a "
                  "second run from saving there at the same time")
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _held_locks[directory] = fd


def loaded_checkpoint(cfg: RunConfig) -> Path | None:
    """The checkpoint checkpoint.load names (None: no load, or the first start of a job that resumes where it
    saves); CheckpointError if checkpoint.load holds none."""
    ckpt = cfg.checkpoint
    if ckpt.load is None:
        return None
    same = ckpt.save is not None and integrity.same_directory(ckpt.load, ckpt.save)
    return integrity.find_checkpoint(ckpt.load, new_run_ok=same)


def require_save_directory(cfg: RunConfig, tag: Path | None) -> None:
    """A run saves into a directory holding checkpoints only to continue that run: a new run there would replace
    its tags and move `latest` back, and a restart at iteration 0 (fine-tuning) would overwrite them."""
    ckpt = cfg.checkpoint
    if ckpt.save is None or not integrity.holds_checkpoints(Path(ckpt.save)):
        return
    latest = tag.name if tag is not None else "?"
    if ckpt.load is None or not integrity.same_directory(ckpt.load, ckpt.save):
        raise CheckpointError(f"checkpoint.save={ckpt.save} already holds another run's checkpoints (latest "
                              f"{integrity.latest_name(Path(ckpt.save))}), which this run would replace: resume it "
                              f"with checkpoint.load={ckpt.save}, or save to a new directory")
    if ckpt.finetune and tag is not None and not integrity.is_weights_only(tag):
        raise CheckpointError(f"checkpoint.finetune=true restarts at iteration 0 in {ckpt.save}, the directory it "
                              f"loads from, and would overwrite its checkpoints (latest {latest}); save the "
                              "fine-tuning run to a new directory")


# The model settings that decide the shapes of the attention, norm and embedding weights (with what None means);
# the MLP slot's shapes depend on the MoE settings too: its tensors are compared one by one when they load.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "normalization", "swiglu", "position_embedding_type", "untie_embeddings_and_output_weights",
              "add_bias_linear", "add_qkv_bias", "qk_layernorm")


def model_shape(run: dict) -> dict:
    """SHAPE_KEYS of a run's model section (dicts, as config.yaml holds them) with defaults resolved; a dense model's
    FFN width too."""
    model = run.get("model", {})
    heads, hidden = model.get("num_attention_heads"), model.get("hidden_size")
    # A key a checkpoint's config.yaml lacks (written before the setting existed) had the setting's default value.
    defaults = {field.name: field.default for field in dataclasses.fields(ModelConfig)
                if field.default is not dataclasses.MISSING}
    defaults |= {"num_query_groups": heads, "kv_channels": hidden // heads}
    shape = {key: model.get(key) if model.get(key) is not None else defaults.get(key) for key in SHAPE_KEYS}
    if model.get("position_embedding_type") == "learned_absolute":
        shape["max_position_embeddings"] = model.get("max_position_embeddings") or run.get("data", {}).get("seq_length")
    if run.get("moe", {}).get("num_experts") is None:
        shape["ffn_hidden_size"] = model.get("ffn_hidden_size") or 4 * hidden
    return shape


def require_same_model(tag: Path, cfg: RunConfig) -> None:
    """ConfigError naming the model settings in which this run differs from the checkpoint's (their weights would
    not fit); the MoE layers are compared tensor by tensor when they load."""
    then, now = model_shape(integrity.read_saved_config(tag)), model_shape(dataclasses.asdict(cfg))
    if changed := [f"model.{key}={now[key]} (the checkpoint has {then.get(key)})" for key in now
                   if key in then and then[key] != now[key]]:
        raise ConfigError(f"{', '.join(changed)}: {tag} holds another model; use its model settings (or start a new "
                          "run)")


def require_same_tokenizer(tag: Path, tokenizer_model: str, tokenizer_type: str = "SentencePieceTokenizer") -> None:
    """CheckpointError if the checkpoint recorded another tokenizer: the embedding rows would mean other pieces."""
    record = integrity.read_json(tag / integrity.TOKENIZER_RECORD)
    if record is None:
        return  # written before megamoe recorded it
    now = tokenizer_identity(tokenizer_model, tokenizer_type)
    if record.get("tokenizer_sha256") != now["tokenizer_sha256"]:
        raise CheckpointError(f"data.tokenizer_model={tokenizer_model} ({now['vocab_size']} pieces) is not the "
                              f"tokenizer {tag} was trained with ({record.get('tokenizer_model')}, "
                              f"{record.get('vocab_size')} pieces): its embedding rows would mean other pieces; use "
                              "that tokenizer (and data tokenized with it)")


SCHEDULE_KEYS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "lr_decay_iters", "train_iters",
                 "weight_decay", "adam_beta1", "adam_beta2", "adam_eps")


def report_schedule_changes(tag: Path, cfg: RunConfig) -> None:
    """Say (rank 0) which optimizer settings a resumed run changes: they apply from the resumed step on (the
    scheduler keeps only the step count, train/optim.py), and config.yaml records them."""
    changed = integrity.config_changes(tag, dump(cfg), tuple(f"train.{key}" for key in SCHEDULE_KEYS))
    if changed and global_rank() == 0:
        get_logger().warning(f"resuming {tag} with a changed optimizer schedule: {', '.join(changed)}; it applies "
                             "from the resumed step on")
