"""GPTDatasetConfig -> BlendedMegatronDatasetBuilder(GPTDataset) -> per-rank micro-batch loaders.

Sample order is a pure function of (seed, consumed samples): step i of training uses global samples
[i*G, (i+1)*G) (G = global batch), and data-parallel rank r takes its micro_batch_size rows of every
micro_batch_size x DP block. So a resumed run continues the same data, and DP=2 sees exactly what DP=1
sees with a doubled micro-batch.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from megamoe.config import Layout, RunConfig, data_split, parse_data_path, valid_sets
from megamoe.data.checks import DataFileError, IndexedDataset, dataset_fingerprint, read_index, require_bin_intact
from megamoe.data.tokenizer import mask_id
from megamoe.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class Datasets:
    train: Dataset
    valid: dict[str, Dataset]
    """The validation sets by name: {'valid': data.split's share of data_path}, or data.valid_data_path's sets;
    {} without validation."""
    files: tuple[IndexedDataset, ...] = ()
    """The indexed datasets read (their .bin files are checked while training reads them: IntactBatches)."""


HELD_OUT_SEED = 0
"""The sample order of data.valid_data_path's sets: the same for runs of every train.seed."""


class MaskedLMDataset(Dataset):
    """BERT-style masked-LM samples over GPTDataset windows: a share p of the tokens is to be predicted, 80% of
    them shown as <mask>, 10% as a random token, 10% unchanged. Drawn from (seed, sample index): every run,
    layout and resume masks a sample alike."""

    def __init__(self, base: Dataset, mask_id: int, vocab_size: int, probability: float, seed: int) -> None:
        self.base, self.mask_id, self.vocab_size = base, mask_id, vocab_size
        self.probability, self.seed = probability, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.base[index]
        tokens = sample["tokens"]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        chosen = torch.rand(tokens.shape, generator=gen) < self.probability
        how = torch.rand(tokens.shape, generator=gen)
        random_ids = torch.randint(self.mask_id + 1, self.vocab_size, tokens.shape, generator=gen)
        inputs = torch.where(chosen & (how < 0.8), self.mask_id, tokens)
        inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
        return {"tokens": inputs, "labels": tokens, "loss_mask": chosen.float() * sample["loss_mask"],
                "position_ids": sample["position_ids"]}


def build_datasets(cfg: RunConfig, layout: Layout, tokenizer) -> Datasets:
    """Train and validation GPTDatasets sized for the run (a blend when data_path has weights); validation reads
    data.split's share of data_path, or each of data.valid_data_path's sets whole.

    Validation always reads the same first eval_iters micro-batches, so values are comparable over time.
    """
    prefixes, weights = parse_data_path(cfg.data.data_path)
    num_valid = cfg.train.eval_iters * cfg.train.micro_batch_size * layout.data_parallel_size
    held_out = valid_sets(cfg.data.valid_data_path) if cfg.data.valid_data_path is not None else {}
    train, valid = _gpt_datasets(cfg, tokenizer, (prefixes, weights), data_split(cfg.data), cfg.train.seed,
                                 cfg.train.train_iters * layout.global_batch_size, 0 if held_out else num_valid)
    sets = {"valid": valid} if valid is not None else {}
    if num_valid:
        sets |= {name: _gpt_datasets(cfg, tokenizer, ([prefix], None), "0,1,0", HELD_OUT_SEED, 0, num_valid)[1]
                 for name, prefix in held_out.items()}
    if cfg.model.objective == "masked_lm":
        mask = mask_id(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
        train = MaskedLMDataset(train, mask, tokenizer.vocab_size, cfg.data.mlm_probability, cfg.train.seed)
        valid_seed = HELD_OUT_SEED if held_out else cfg.train.seed
        sets = {name: MaskedLMDataset(d, mask, tokenizer.vocab_size, cfg.data.mlm_probability, valid_seed + 1)
                for name, d in sets.items()}
    files = tuple(read_index(prefix) for prefix in [*prefixes, *held_out.values()])
    return Datasets(train=train, valid=sets, files=files)


def _gpt_datasets(cfg: RunConfig, tokenizer, blend: tuple[list[str], list[float] | None], split: str, seed: int,
                  num_train: int, num_valid: int) -> tuple[Dataset | None, Dataset | None]:
    """(train, valid) GPTDatasets of `blend` cut by `split`; None for a split asked no samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    # megatron keys its cache by the prefix, not the files: a fingerprint of them keeps a replaced dataset from
    # reading the sample index of the one it replaced.
    cache = str(Path(cache_dir(cfg)) / dataset_fingerprint(blend[0]))
    dataset_cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=cfg.data.seq_length, blend=blend, split=split, path_to_cache=cache,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=False,  # causal masks are built once per shape, not per sample
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_train, num_valid, 0], lambda: True,
                                                    dataset_cfg).build()
    return (train if num_train else None), (valid if num_valid else None)


def cache_dir(cfg: RunConfig) -> str:
    """Where megatron's sample indices are cached: data.data_cache_path, or 'cache' beside the first dataset."""
    return cfg.data.data_cache_path or str(Path(parse_data_path(cfg.data.data_path)[0][0]).parent / "cache")


class IntactBatches:
    """A loader's micro-batches, its datasets' .bin files checked (by size, at most once a second) as they are read:
    a file truncated or replaced under a running job ends it naming the file (DataFileError) before a read of it
    would give a bus error or garbage tokens."""

    def __init__(self, loader: DataLoader, files: tuple[IndexedDataset, ...], interval_s: float = 1.0) -> None:
        self.loader, self.files, self.interval_s = loader, files, interval_s

    def __iter__(self) -> Iterator[dict]:
        batches, checked = iter(self.loader), 0.0
        while True:
            if time.monotonic() - checked >= self.interval_s:  # before the read: in the rank it would be a bus error
                require_files_intact(self.files)
                checked = time.monotonic()
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch


def require_files_intact(files: tuple[IndexedDataset, ...]) -> None:
    """DataFileError naming the first .bin that no longer holds what its index describes."""
    for dataset in files:
        try:
            require_bin_intact(dataset)
        except DataFileError as err:
            raise DataFileError(f"while training: {err}") from None


@contextlib.contextmanager
def blamed_on_changed_files(files: tuple[IndexedDataset, ...]):
    """Around training: a failure while a dataset file no longer matches its index is reported as that file's
    DataFileError. A data worker killed by SIGBUS (it read past the end of a truncated .bin) makes PyTorch raise in
    the rank wherever it happens to be, a forward pass as likely as the next read."""
    try:
        yield
    except Exception as err:
        try:
            require_files_intact(files)
        except DataFileError as changed:
            raise changed from err
        raise


class MicroBatchSampler:
    """Index lists of this rank's micro-batches, starting after `consumed_samples` global samples."""

    def __init__(self, num_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        self.num_samples, self.consumed = num_samples, consumed_samples
        self.micro, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        block = self.micro * self.dp_size  # one micro-step of every data-parallel rank
        for block_start in range(self.consumed, self.num_samples - block + 1, block):
            first = block_start + self.dp_rank * self.micro
            yield list(range(first, first + self.micro))

    def __len__(self) -> int:
        return max(0, (self.num_samples - self.consumed) // (self.micro * self.dp_size))


def build_loader(dataset: Dataset, consumed_samples: int, cfg: RunConfig, groups: ParallelGroups,
                 in_process: bool = False) -> DataLoader:
    """Micro-batches of `dataset` for this data-parallel rank (TP peers read the same rows), read by
    cfg.data.num_workers worker processes or, `in_process`, by the caller."""
    sampler = MicroBatchSampler(len(dataset), consumed_samples, cfg.train.micro_batch_size,
                                groups.dp_rank, groups.dp_size)
    workers = 0 if in_process else cfg.data.num_workers
    # Its own generator: a DataLoader iterator otherwise draws its worker seed from the global torch RNG,
    # and a resumed run (which restores that RNG before creating its loaders) would drift from the
    # uninterrupted one. The samples themselves are fixed by the sampler.
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if workers else None, generator=generator,
                      worker_init_fn=_ignore_stop_signals if workers else None)


def _ignore_stop_signals(worker_id: int) -> None:
    """A data worker leaves Ctrl-C and SIGTERM to its rank, which stops at the next step boundary with a checkpoint
    (train/preemption.py) and needs the worker until then; the worker dies with the rank (train/watchdog.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
