"""For one platform patch: run the smallest megatron setup that needs it without it, then with it.

python tests/unit/platform_probe.py <patch>   prints 'WITHOUT: <error>' then 'WITH: ok' (fresh process:
patches are process-wide). Multi-rank setups run under the test's spawn helper instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def init_world(ep: int = 1) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
        dist.init_process_group("gloo")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)


def gpt_forward() -> None:
    """megatron's local GPT: attention buffers and RoPE are placed on torch.cuda.current_device()."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    init_world()
    model_parallel_cuda_manual_seed(1)  # attention dropout forks the model-parallel stream
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=8,
                     position_embedding_type="rope")
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).triu(1)
    model(ids, torch.arange(8).expand(2, -1), mask, labels=ids).mean().backward()


def rng_tracker() -> None:
    """model_parallel_cuda_manual_seed, and fork() really drawing from the seeded model-parallel stream."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    init_world()
    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(123)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(123 + 2718))  # seed + 2718 + tp_rank
    outside_before = torch.get_rng_state()
    with capture_logs("megatron.core.tensor_parallel.random") as logged, get_cuda_rng_tracker().fork():
        drawn = torch.rand(4)
    assert torch.equal(drawn, expected), "fork() did not switch to the model-parallel stream"
    assert torch.equal(torch.get_rng_state(), outside_before), "fork() did not restore the default stream"
    assert not logged, f"fork() logged {logged} for the draws it exists for"


@contextlib.contextmanager
def capture_logs(name: str):
    """The messages logger `name` lets through (its filters applied) while active."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def moe_layer(ep: int = 1) -> None:
    """megatron's stock MoELayer with the alltoall dispatcher: build it, forward and backward."""
    import torch.distributed as dist
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    init_world(ep)
    model_parallel_cuda_manual_seed(1)
    cfg = TransformerConfig(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                            num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                            expert_model_parallel_size=ep, use_cpu_initialization=True, add_bias_linear=False,
                            moe_aux_loss_coeff=0.0)
    spec = get_gpt_layer_local_spec(num_experts=4)
    layer = MoELayer(cfg, submodules=spec.submodules.mlp.submodules)
    torch.manual_seed(dist.get_rank())  # different tokens per rank: uneven all-to-all splits
    x = torch.randn(8, 2, 16, requires_grad=True)
    out, _ = layer(x)
    out.sum().backward()


SETUPS = {
    "current_device_is_cpu": (gpt_forward, "Torch not compiled with CUDA enabled"),
    "rng_tracker_on_cpu": (rng_tracker, "Torch not compiled with CUDA enabled"),
    "cuda_streams_are_noops": (moe_layer, "torch.cuda.Stream requires CUDA support"),
    "te_general_gemm_defined": (moe_layer, "name 'te_general_gemm' is not defined"),
}


def without_then_with(patch: str, setup) -> tuple[str, str]:
    """(error without the patch, 'ok' or the error with it)."""
    from megamoe import platform

    platform.apply(skip={patch})
    try:
        setup()
        without = "no error"
    except Exception as err:  # noqa: BLE001 - the probe reports whatever megatron raises
        without = f"{type(err).__name__}: {err}"
    platform.apply()
    try:
        setup()
        with_patch = "ok"
    except Exception as err:  # noqa: BLE001
        with_patch = f"{type(err).__name__}: {err}"
    return without, with_patch


if __name__ == "__main__":
    name = sys.argv[1]
    without, with_patch = without_then_with(name, SETUPS[name][0])
    print(f"WITHOUT: {without}\nWITH: {with_patch}")
