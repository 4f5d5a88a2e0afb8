"""Checks before anything heavy starts: the launcher calls `check` before any process group exists."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from megamoe.config import (
    ConfigError,
    Environment,
    Layout,
    RunConfig,
    data_split,
    parse_data_path,
    valid_sets,
    validate,
)
from megamoe.data.loader import cache_dir
from megamoe.data.tokenizer import mask_id, vocab_size
from megamoe.parallel.launch import discover_ranks
from megamoe.train import preflight
from megamoe.utils import get_logger, global_rank


def environment(cfg: RunConfig) -> Environment:
    """Facts validation needs: world size from the launcher's environment, CUDA, the tokenizer's size."""
    try:
        data = cfg.data
        size, mask = vocab_size(data.tokenizer_model, data.tokenizer_type), mask_id(data.tokenizer_model,
                                                                                    data.tokenizer_type)
    except ValueError as err:  # a file that is not a tokenizer of data.tokenizer_type
        raise ConfigError(f"data.tokenizer_model: {err} (data.tokenizer_type={cfg.data.tokenizer_type})") from None
    return Environment(world_size=int(os.environ.get("WORLD_SIZE", "1")), cuda_available=torch.cuda.is_available(),
                       tokenizer_vocab_size=size, tokenizer_has_mask=mask is not None)


def check(cfg: RunConfig) -> Layout:
    """Validate `cfg` for this launch and its files (ConfigError, or CheckpointError for a checkpoint that must not
    be used, on a mistake) and select DeepSpeed's accelerator. The ranks come from the launcher first (deepspeed,
    torchrun, srun or mpirun: parallel/launch.py)."""
    discover_ranks()
    env = environment(cfg)
    layout = validate(cfg, env)
    check_data_files(cfg, env, layout)
    check_memory(cfg, env)
    check_deepspeed_extra(cfg, layout)
    preflight.check_run(cfg, cache_dir(cfg))
    set_runtime_environment(env.cuda_available)
    return layout


def check_data_files(cfg: RunConfig, env: Environment, layout: Layout) -> None:
    """ConfigError naming a dataset file that is truncated, foreign, tokenized with another tokenizer, holding ids
    outside it, or too small for the split (a split without documents would hang megatron's index builder)."""
    from megamoe.data.checks import DataFileError, check_indexed_dataset, check_splits

    prefixes, weights = parse_data_path(cfg.data.data_path)
    held_out = list(valid_sets(cfg.data.valid_data_path).values()) if cfg.data.valid_data_path is not None else []
    shares = [w / sum(weights or [1.0]) for w in weights or [1.0]]
    checked = [*(("data_path", p, data_split(cfg.data), share) for p, share in zip(prefixes, shares, strict=False)),
               *(("valid_data_path", p, "0,1,0", None) for p in held_out)]
    for key, prefix, split, share in checked:  # share: of the training blend
        try:
            dataset = check_indexed_dataset(prefix, cfg.data.tokenizer_model, env.tokenizer_vocab_size,
                                            cfg.data.tokenizer_type)
            warnings = check_splits(dataset, split, cfg.data.seq_length)
        except DataFileError as err:
            raise ConfigError(f"data.{key}: {err}") from None
        if share is not None:
            check_sample_indices(cfg, layout, dataset, share)
        for warning in warnings if global_rank() == 0 else ():
            get_logger().warning(f"data.{key}: {warning}")


def check_sample_indices(cfg: RunConfig, layout: Layout, dataset, share: float) -> None:
    """ConfigError when megatron's sample indices for the steps asked for would not fit in this machine's memory
    (an extra zero in train.train_iters or train.eval_iters: megatron would build them for minutes, then die)."""
    from megamoe.data.checks import sample_index_bytes, split_sizes
    from megamoe.moe.plan import GiB

    available = machine_memory()
    eval_samples = cfg.train.eval_iters * cfg.train.micro_batch_size * layout.data_parallel_size
    asked = (("train.train_iters", cfg.train.train_iters * layout.global_batch_size),
             ("train.eval_iters", eval_samples))
    for (key, samples), size in zip(asked, split_sizes(dataset, data_split(cfg.data)), strict=False):
        if size is None:
            continue
        documents, tokens = size
        needed = sample_index_bytes(int(samples * share) + 1, cfg.data.seq_length, documents, tokens)
        if available is not None and documents and needed > available:
            raise ConfigError(f"{key}={getattr(cfg.train, key.split('.')[1])} asks for {samples:,} samples of "
                              f"{dataset.prefix} ({tokens:,} tokens in that split): megatron's sample index for them "
                              f"needs about {needed / GiB:,.0f} GiB, more than the {available / GiB:,.0f} GiB of this "
                              "machine; ask for fewer")


def check_memory(cfg: RunConfig, env: Environment) -> None:
    """ConfigError when the planner (moe/plan.py) puts a rank above the memory it has: a sequence length or
    batch far beyond the machine fails now, not as an out-of-memory kill (or swap) later."""
    from megamoe.moe.plan import GiB, plan

    available = memory_per_rank(env.cuda_available)
    stages = plan(cfg, env.world_size, env.tokenizer_vocab_size)
    worst = max(stages, key=lambda s: s.total_bytes)
    if available is not None and worst.total_bytes > available:
        raise ConfigError(f"this run needs about {worst.total_bytes / GiB:,.1f} GiB per rank (pipeline stage "
                          f"{worst.stage}: weights, optimizer states and the activations of data.seq_length="
                          f"{cfg.data.seq_length} x train.micro_batch_size={cfg.train.micro_batch_size}), more than "
                          f"the {available / GiB:,.1f} GiB a rank has here; python tools/plan.py shows the sums")


def memory_per_rank(cuda_available: bool) -> int | None:
    """Bytes one rank may use: its GPU's memory, or the machine's (its cgroup limit, if lower) shared by the ranks
    of this node. None when unknown."""
    if cuda_available:
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    if (total := machine_memory()) is None:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE", 1))
    return total // max(1, local)


def machine_memory() -> int | None:
    """This machine's memory in bytes (its cgroup limit, if lower); None when unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file() and (text := limit.read_text().strip()).isdigit():
        total = min(total, int(text))
    return total


def check_deepspeed_extra(cfg: RunConfig, layout: Layout) -> None:
    """ConfigError when DeepSpeed refuses the config deepspeed.extra makes (a wrong value); a warning for a top-level
    key DeepSpeed never reads (a typo it would ignore). Imports DeepSpeed only when deepspeed.extra is set."""
    if not cfg.deepspeed.extra:
        return
    from megamoe.train.deepspeed import read_deepspeed_config

    try:
        unread = read_deepspeed_config(cfg, layout)
    except Exception as err:  # noqa: BLE001 - DeepSpeed raises pydantic, assertion and value errors alike
        reason = " ".join(str(err).split("For further information")[0].split())  # pydantic's link: noise
        raise ConfigError(f"deepspeed.extra={cfg.deepspeed.extra}: DeepSpeed refuses it: {reason[:300]}") from None
    for key in unread if global_rank() == 0 else ():
        get_logger().warning(f"deepspeed.extra.{key} is not a DeepSpeed setting: DeepSpeed ignores it (a typo?)")


def set_runtime_environment(cuda_available: bool) -> None:
    """Environment DeepSpeed reads at import: its accelerator, and where it JIT-builds C++ ops."""
    if not cuda_available:
        # DeepSpeed picks its accelerator at import; its CPU accelerator communicates over gloo.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # One JIT cache per environment: two environments sharing ~/.cache/torch_extensions rebuild each
    # other's ops on every start (docs/integration.md §1).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    # PyTorch's CPU allocator asks for transparent huge pages for large tensors: a fresh 1 GB gradient (PEER's
    # tables) then costs ~70 ms instead of ~300+ ms of 4 KB page faults. Read at every allocation.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
