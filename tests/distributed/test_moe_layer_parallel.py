"""An expert-parallel MoE layer against the single-process layer holding the same global weights (fp32, gloo).

Every rank builds both: the reference (EP = 1, all experts, all tokens) and its shard of the parallel layer
(its experts, its slice of the tokens). Outputs and input gradients must match the reference's rows of that
slice; expert gradients summed over expert-data-parallel replicas and router gradients summed over
data-parallel ranks must match the reference's (relative difference <= 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import spawn

LAYOUTS = {
    2: [{"expert_model_parallel_size": 2},
        {"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 1}],
    4: [{"expert_model_parallel_size": 4},
        {"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 2}],
}
D, TOKENS_PER_RANK = 16, 12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _layers(par: dict, **moe):
    from megamoe.config import ParallelConfig
    from megamoe.moe import LayerShape, build_moe
    from megamoe.parallel.groups import ParallelGroups
    from megamoe.parallel.initialize import initialize
    from megamoe.variants.topk import TopKMoEConfig

    groups = initialize(ParallelConfig(**par), seed=7)
    cfg = TopKMoEConfig(**{"num_experts": 8, "router_topk": 2, "aux_loss_coeff": 0.0, **moe})
    shape = LayerShape(hidden_size=D, ffn_hidden_size=24, swiglu=True, init_std=0.2, num_layers=2, layer_number=1,
                       seed=11)
    reference = build_moe(cfg, shape, ParallelGroups.single_process())
    sharded = build_moe(cfg, shape, groups)
    sharded.router.load_state_dict(reference.router.state_dict())
    return reference, sharded, groups


def _global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    rows = world * TOKENS_PER_RANK
    return torch.randn(rows, D, generator=gen), torch.randn(rows, D, generator=gen)


def _sum_over(tensor: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    tensor = tensor.clone()
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


def _parity(par: dict) -> dict[str, float]:
    """Relative differences of the sharded layer against the reference."""
    import torch.distributed as dist

    from megamoe.moe import host

    reference, sharded, groups = _layers(par)
    rank, world = dist.get_rank(), dist.get_world_size()
    first, num_local = sharded.experts.first_expert, sharded.experts.num_local
    init = max(_rel(sharded.experts.linear_fc1, reference.experts.linear_fc1[first:first + num_local]), 0.0)
    x_TD, g_TD = _global_batch(world)
    x_ref = x_TD.clone().requires_grad_()
    (reference(x_ref) * g_TD).sum().backward()
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)  # each rank routes its own tokens
    x_local = x_TD[mine].clone().requires_grad_()
    # Replicas of these experts whose gradients the model itself does not sum: expert-data-parallel ranks
    # (DeepSpeed reduces over them); with EP = 1 the TP peers are summed in autograd, leaving the DP ranks.
    replicas = groups.edp_group if groups.ep_size > 1 else groups.dp_group
    reads_before = sum(host.READS.values())
    out = sharded(x_local)
    (out * g_TD[mine]).sum().backward()
    # One host read per forward and backward: the split sizes under EP (which give the experts' row ranges
    # too), the experts' row ranges without it.
    extra_reads = sum(host.READS.values()) - reads_before - 1
    return {
        "host reads beyond one": float(extra_reads),
        "initial experts": init,
        "output": _rel(out.detach(), reference(x_TD).detach()[mine]),
        "input grad": _rel(x_local.grad, x_ref.grad[mine]),
        "expert fc1 grad": _rel(_sum_over(sharded.experts.linear_fc1.grad, replicas),
                                reference.experts.linear_fc1.grad[first:first + num_local]),
        "expert fc2 grad": _rel(_sum_over(sharded.experts.linear_fc2.grad, replicas),
                                reference.experts.linear_fc2.grad[first:first + num_local]),
        "router grad": _rel(_sum_over(sharded.router.weight.grad, groups.dp_group), reference.router.weight.grad),
    }


def _variable_k_and_capacity() -> dict[str, float]:
    """Hand-made routings through the all-to-all: 0-copy tokens, empty experts, a rank receiving nothing."""
    import torch.distributed as dist

    from megamoe.moe.routing import Routing
    from tests.unit.test_moe_layer import loop_reference

    reference, sharded, _ = _layers({"expert_model_parallel_size": 2})
    rank = dist.get_rank()
    x_TD = torch.randn(4, D, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    # Rank 0 sends 0, 1 and 3 copies per token to experts 0-3 only (rank 0's), so rank 1 receives nothing
    # from it; rank 1 routes every copy to expert 7 and leaves token 2 without any expert.
    token, expert = ([0, 0, 0, 1, 3], [0, 2, 3, 1, 1]) if rank == 0 else ([0, 1, 3], [7, 7, 7])
    routing = Routing(token_N=torch.tensor(token), expert_N=torch.tensor(expert), weight_N=torch.rand(len(token)),
                      probs_TE=None, logits_TE=None, valid_T=None, num_tokens=4, num_experts=8)
    x_RD, counts_e, meta = sharded.dispatcher.dispatch(x_TD, routing)
    out = sharded.dispatcher.combine(sharded.experts(x_RD, counts_e), routing, meta)
    want = loop_reference(reference, x_TD, routing)
    grad_out = torch.autograd.grad(out.square().sum(), x_TD)[0]
    grad_want = torch.autograd.grad(want.square().sum(), x_TD)[0]
    rows_received = x_RD.shape[0]
    # Capacity with padding (static splits, no count exchange) equals the same capacity on the rank's tokens.
    capped_ref, capped, _ = _layers({"expert_model_parallel_size": 2}, expert_capacity_factor=0.5,
                                    pad_expert_input_to_capacity=True)
    x_cap = torch.randn(16, D, generator=torch.Generator().manual_seed(10 + rank))
    return {"output": _rel(out.detach(), want.detach()), "input grad": _rel(grad_out, grad_want),
            "zero rows": float(out[2].abs().sum() if rank == 0 else out[2].abs().sum()),
            "rows received": float(rows_received),
            "capacity output": _rel(capped(x_cap).detach(), capped_ref(x_cap).detach()),
            "capacity dropped": float(capped.pop_stats()["dropped"])}


@pytest.fixture(scope="module")
def parity() -> dict:
    results = {}
    for world, layouts in LAYOUTS.items():
        per_rank = spawn(_run_layouts, world, layouts)
        for i, layout in enumerate(layouts):
            results[_name(layout)] = [r[i] for r in per_rank]
    return results


def _run_layouts(layouts: list[dict]) -> list[dict]:
    return [_parity(layout) for layout in layouts]


def _name(layout: dict) -> str:
    tp, ep = layout.get("tensor_model_parallel_size", 1), layout["expert_model_parallel_size"]
    return f"TP{tp}xEP{ep}" if tp > 1 else f"EP{ep}"


@pytest.mark.parametrize("layout", ["EP2", "EP4", "TP2xEP1", "TP2xEP2"])
def test_expert_parallel_layer_matches_single_process(parity, layout):
    for rank, diffs in enumerate(parity[layout]):
        print(layout, "rank", rank, {k: f"{v:.1e}" for k, v in diffs.items()})
        assert diffs["initial experts"] == 0.0, "expert initialisation depends on the sharding"
        for name, value in diffs.items():
            assert value <= 1e-5, f"{layout} rank {rank}: {name} differs by {value:.2e}"


def test_variable_k_empty_experts_and_ranks_and_capacity():
    for rank, diffs in enumerate(spawn(_variable_k_and_capacity, 2)):
        assert diffs["output"] <= 1e-6 and diffs["input grad"] <= 1e-6, diffs
        assert diffs["zero rows"] == 0.0, "a token without experts must get exactly 0"
        assert diffs["capacity output"] <= 1e-6 and diffs["capacity dropped"] > 0, diffs
        if rank == 1:
            assert diffs["rows received"] == 3  # only its own copies for expert 7: rank 0 sent none
