"""CartesianMoE under expert parallelism against one process (fp32, gloo): the layer with EP=2 (outputs, input,
expert and router gradients), and the whole model for 3 steps with EP=2 + ZeRO-2 and with TP=2 (sequence
parallel), both sub-layers dispatching through the all-to-all."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import max_rel_diff, spawn, train_steps

D, TOKENS_PER_RANK = 16, 12
CARTESIAN = ["moe.variant=cartesian", "moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
             "moe.shared_expert_intermediate_size=64", "moe.router_load_balancing_type=seq_aux_loss",
             "train.train_iters=3", "train.clip_grad=0.05"]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _layer_parity() -> dict[str, float]:
    import torch.distributed as dist

    from megamoe.config import ParallelConfig
    from megamoe.moe import LayerShape, build_moe
    from megamoe.parallel.groups import ParallelGroups
    from megamoe.parallel.initialize import initialize
    from megamoe.variants.cartesian import CartesianMoEConfig

    groups = initialize(ParallelConfig(expert_model_parallel_size=2), seed=7)
    cfg = CartesianMoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=12, shared_expert_intermediate_size=12,
                             aux_loss_coeff=0.0)
    shape = LayerShape(hidden_size=D, ffn_hidden_size=24, swiglu=True, init_std=0.2, num_layers=2, layer_number=1,
                       seed=3)
    reference, sharded = build_moe(cfg, shape, ParallelGroups.single_process()), build_moe(cfg, shape, groups)
    sharded.load_state_dict({k: v for k, v in reference.state_dict().items() if ".experts." not in k}, strict=False)
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(5)
    x_TD, g_TD = torch.randn(2 * TOKENS_PER_RANK, D, generator=gen), torch.randn(2 * TOKENS_PER_RANK, D, generator=gen)
    x_ref = x_TD.clone().requires_grad_()
    (reference(x_ref) * g_TD).sum().backward()
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    x = x_TD[mine].clone().requires_grad_()
    out = sharded(x)
    (out * g_TD[mine]).sum().backward()
    diffs = {"output": _rel(out.detach(), reference(x_TD).detach()[mine]), "input grad": _rel(x.grad, x_ref.grad[mine])}
    for sub in ("moe_a", "moe_b"):
        mine_e, ref_e = getattr(sharded, sub).experts, getattr(reference, sub).experts
        rows = slice(mine_e.first_expert, mine_e.first_expert + mine_e.num_local)
        diffs[f"{sub} expert grad"] = _rel(mine_e.linear_fc1.grad, ref_e.linear_fc1.grad[rows])
        router = getattr(sharded, sub).router.weight.grad.clone()
        dist.all_reduce(router)  # each rank's part: its tokens
        diffs[f"{sub} router grad"] = _rel(router, getattr(reference, sub).router.weight.grad)
    return diffs


def test_expert_parallel_layer_matches_one_process():
    for rank, diffs in enumerate(spawn(_layer_parity, 2)):
        print("rank", rank, {k: f"{v:.1e}" for k, v in diffs.items()})
        for key, value in diffs.items():
            assert value <= 1e-5, f"rank {rank}: {key} differs by {value:.2e}"


def _train(data: dict, overrides: list[str]) -> dict:
    run = train_steps(data, [*CARTESIAN, *overrides], 3)
    run.pop("trainer")
    return run


@pytest.fixture(scope="module")
def reference(tiny_data) -> dict:
    return spawn(_train, 1, tiny_data, ["train.micro_batch_size=8"])[0]


@pytest.mark.parametrize("layout", [
    ["train.micro_batch_size=4", "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"],
    ["train.micro_batch_size=8", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
], ids=["ep2_zero2", "tp2"])
def test_training_matches_one_process(tiny_data, reference, layout):
    run = spawn(_train, 2, tiny_data, layout)[0]
    loss_diff = max(abs(a - b) / b for a, b in zip(run["losses"], reference["losses"], strict=True))
    weight_diff = max_rel_diff(run["full"], reference["full"])
    print(f"losses {run['losses']} vs {reference['losses']} (max rel {loss_diff:.1e}), weights {weight_diff:.1e}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5
