"""The ZeRO-0 fp32 gradient norm megamoe logs and skips steps by: DeepSpeed's get_flattened_grad_norm, with one host
read per step where DeepSpeed reads every parameter's norm (a synchronisation each on an accelerator)."""

from __future__ import annotations

from tests.helpers import spawn


def _both_norms() -> list[tuple[float, float]]:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.utils import get_flattened_grad_norm

    from megamoe.moe import host
    from megamoe.train.deepspeed import grad_norm

    deepspeed.init_distributed("gloo")

    class ModelParallel:  # the two ranks hold different shards: the norm sums over both
        def get_model_parallel_group(self):
            return dist.group.WORLD

    torch.manual_seed(dist.get_rank())
    params = [torch.nn.Parameter(torch.randn(n)) for n in (10, 1000, 33, 70_000)]
    params.append(torch.nn.Parameter(torch.randn(5)))  # no gradient: left out by both
    for p in params[:-1]:
        p.grad = torch.randn_like(p) * 0.01
    out = []
    for poison in (None, float("nan"), float("inf")):
        if poison is not None and dist.get_rank() == 1:
            params[1].grad[3] = poison
        out.append((get_flattened_grad_norm(params, mpu=ModelParallel()), grad_norm(params, dist.group.WORLD)))
    assert not host.READS  # no read through the MoE layers' door either
    return out


def test_gradient_norm_equals_deepspeeds_bitwise_and_reports_non_finite_as_minus_one():
    for rank_values in spawn(_both_norms, 2):
        (finite_ds, finite), (nan_ds, nan), (inf_ds, inf) = rank_values
        assert finite == finite_ds and 0 < finite < float("inf")
        assert nan == nan_ds == -1 and inf == inf_ds == -1
