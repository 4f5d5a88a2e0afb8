"""Where megamoe patches megatron-core: what megatron-core 0.16.1 needs to run on CPU + gloo. (The one other patch
of third-party code, DeepSpeed's unused CPU shared-memory all-reduce switched off, is beside the engine set-up:
`megamoe.train.deepspeed.no_cpu_shared_memory_all_reduce`.)

megatron-core assumes a CUDA device in a few places. Each patch below is a named function that says what
upstream assumes and where; `apply()` runs them once, and only when CUDA is unavailable (on a GPU machine
nothing is patched). `tests/unit/test_platform.py` shows, per patch, the error megatron raises without it.

Deliberately not patched, because no megatron code path megamoe runs needs them (see docs/integration.md §2.1):
`Tensor.cuda()` (broadcast_data, megatron optimizer state), `Tensor.type()` (megatron optimizer),
`device="cuda"` keyword arguments and `torch.cuda.synchronize` (megatron pipeline schedules; megamoe
trains through DeepSpeed's engine), and `WrappedTorchNorm` under sequence parallelism (megamoe builds its
own norms, `megamoe.models.norms`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

import torch


def _current_device_is_cpu() -> None:
    """megatron passes `torch.cuda.current_device()` as a device: GlobalMemoryBuffer for local attention
    (core/utils.py), RotaryEmbedding, Router.gating (transformer/moe/router.py)."""
    torch.cuda.current_device = lambda: torch.device("cpu")


def _rng_tracker_on_cpu() -> None:
    """The model-parallel RNG tracker (tensor_parallel/random.py) keeps named CUDA generator states: it
    seeds one per TP rank with `torch.cuda.manual_seed` and swaps it in with `_set_cuda_rng_state`.

    On CPU the tracker's states become CPU generator states: `add()` seeds a real stream (seed + 2718 +
    tp_rank, as on GPU) and `fork()` really switches the CPU generator to it and back. fork()'s warning that
    the CPU generator changed inside it is then a given (dropout draws from it), not a bug: it is dropped,
    as it would otherwise be most of a CPU run's log (one line per dropout per micro-batch).
    """
    import megatron.core.tensor_parallel.random as mp_random
    import torch.cuda.random as cuda_random

    def get_state(*args, **kwargs) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(state: torch.Tensor, *args, **kwargs) -> None:
        torch.set_rng_state(state)

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(seed)

    torch.cuda.get_rng_state = cuda_random.get_rng_state = get_state
    torch.cuda.manual_seed = cuda_random.manual_seed = manual_seed
    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    logging.getLogger(mp_random.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context")


class _NoStream:
    """Stands in for torch.cuda.Stream and torch.cuda.Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _NoStream()

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _cuda_streams_are_noops() -> None:
    """MoEAlltoAllTokenDispatcher creates a `torch.cuda.Stream()` for its device-to-host copy
    (transformer/moe/token_dispatcher.py); megatron's MoELayer cannot be built on CPU without it."""
    default = _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *args, **kwargs: default
    torch.cuda.default_stream = lambda *args, **kwargs: default
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


def _te_general_gemm_defined() -> None:
    """moe_utils refers to `te_general_gemm`, bound only when TransformerEngine imports; the stock
    TopKRouter's gating fails with NameError without it."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _split_sizes_as_numpy() -> None:
    """`maybe_move_tensor_to_cpu(..., as_numpy=True)` converts only CUDA tensors, so on CPU the alltoall
    dispatcher hands tensors as split sizes to all_to_all_single, which gloo rejects (EP > 1)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu  # imported by name there


PATCHES: dict[str, Callable[[], None]] = {
    "current_device_is_cpu": _current_device_is_cpu,
    "rng_tracker_on_cpu": _rng_tracker_on_cpu,
    "cuda_streams_are_noops": _cuda_streams_are_noops,
    "te_general_gemm_defined": _te_general_gemm_defined,
    "split_sizes_as_numpy": _split_sizes_as_numpy,
}

_applied: set[str] = set()


def apply(skip: Iterable[str] = ()) -> list[str]:
    """Apply every patch not in `skip`, each at most once per process; a no-op when CUDA is available.

    Returns the names applied so far. `skip` exists for the tests that show each patch is needed.
    """
    if torch.cuda.is_available():
        return []
    skip = set(skip)
    if unknown := skip - PATCHES.keys():
        raise ValueError(f"unknown platform patches {sorted(unknown)}; choose from {sorted(PATCHES)}")
    for name, patch in PATCHES.items():
        if name not in skip and name not in _applied:
            patch()
            _applied.add(name)
    return sorted(_applied)
