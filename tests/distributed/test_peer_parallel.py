"""PEER with sharded tables against the unsharded layer (fp32, gloo): the tables row-sharded over EP=2 (router
replicated on the gathered tokens, partial outputs reduce-scattered), and TP=2 with sequence parallelism
(tables replicated, gradients summed over TP); then the whole model under DeepSpeed ZeRO-2 with EP=2 for 3 steps
against one process. BatchNorm on (its statistics over the whole micro-batch either way); LayerNorm under TP=2 as
well (its gradients summed over the ranks like the query's)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import max_rel_diff, spawn, train_steps

D, TOKENS_PER_RANK = 16, 12
TP2 = {"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 1}
LAYOUTS = [({"expert_model_parallel_size": 2}, "batchnorm"), (TP2, "batchnorm"), (TP2, "layernorm")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _sum(t: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    t = t.clone()
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def _layer_parity(layouts: list[dict]) -> list[dict]:
    import torch.distributed as dist

    from megamoe.config import ParallelConfig
    from megamoe.moe import LayerShape, build_moe
    from megamoe.parallel.groups import ParallelGroups
    from megamoe.parallel.initialize import initialize
    from megamoe.variants.peer import PEERMoEConfig

    out = []
    for par, query_norm in layouts:
        groups = initialize(ParallelConfig(**par), seed=7)
        cfg = PEERMoEConfig(num_experts=256, num_heads=2, topk_per_head=4, key_dim=8, chunk_tokens=5,
                            query_norm=query_norm)
        shape = LayerShape(hidden_size=D, ffn_hidden_size=32, swiglu=True, init_std=0.2, num_layers=2,
                           layer_number=1, seed=3)
        reference = build_moe(cfg, shape, ParallelGroups.single_process())
        sharded = build_moe(cfg, shape, groups)
        sharded.load_state_dict({k: v for k, v in reference.state_dict().items() if "experts" not in k}, strict=False)
        rows = slice(sharded.experts.first_expert, sharded.experts.first_expert + sharded.experts.num_local)
        rank, world = dist.get_rank(), dist.get_world_size()
        gen = torch.Generator().manual_seed(11)
        x_TD, g_TD = torch.randn(world * TOKENS_PER_RANK, D, generator=gen), torch.randn(world * TOKENS_PER_RANK, D,
                                                                                        generator=gen)
        x_ref = x_TD.clone().requires_grad_()
        (reference(x_ref) * g_TD).sum().backward()
        mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
        x_local = x_TD[mine].clone().requires_grad_()
        (sharded(x_local) * g_TD[mine]).sum().backward()
        sharded.eval()
        reference.eval()
        dense = {n: p.grad for n, p in sharded.named_parameters() if "experts" not in n}
        out.append({**({"bn running mean": _rel(sharded.query_norm.running_mean, reference.query_norm.running_mean)}
                        if query_norm == "batchnorm" else {}),
            "initial tables": _rel(sharded.experts.down.detach(), reference.experts.down.detach()[rows]),
            "output": _rel(sharded(x_TD[mine]).detach(), reference(x_TD).detach()[mine]),
            "input grad": _rel(x_local.grad, x_ref.grad[mine]),
            "table grads": max(_rel(getattr(sharded.experts, t).grad, getattr(reference.experts, t).grad[rows])
                               for t in ("down", "up")),
            "router grads": max(_rel(_sum(g, groups.dp_group), dict(reference.named_parameters())[n].grad)
                                for n, g in dense.items()),
        })
    return out


@pytest.fixture(scope="module")
def layer_results() -> list[list[dict]]:
    return spawn(_layer_parity, 2, LAYOUTS)


@pytest.mark.parametrize("index, name", [(0, "EP2"), (1, "TP2xEP1"), (2, "TP2xEP1 LayerNorm")])
def test_sharded_peer_layer_matches_unsharded(layer_results, index, name):
    for rank, diffs in enumerate(r[index] for r in layer_results):
        print(name, "rank", rank, {k: f"{v:.1e}" for k, v in diffs.items()})
        assert diffs["initial tables"] == 0.0
        for key, value in diffs.items():
            assert value <= 1e-5, f"{name} rank {rank}: {key} differs by {value:.2e}"


PEER = ["moe.variant=peer", "moe.num_experts=256", "moe.num_heads=2", "moe.topk_per_head=4", "moe.key_dim=16",
        "train.train_iters=3", "train.clip_grad=0.05"]


def _train(data: dict, overrides: list[str]) -> dict:
    run = train_steps(data, [*PEER, *overrides], 3)
    run.pop("trainer")
    return run


def test_zero2_ep2_training_matches_one_process(tiny_data):
    ref = spawn(_train, 1, tiny_data, ["train.micro_batch_size=8"])[0]
    run = spawn(_train, 2, tiny_data, ["train.micro_batch_size=4", "parallel.expert_model_parallel_size=2",
                                       "deepspeed.zero_stage=2"])[0]
    loss_diff = max(abs(a - b) / b for a, b in zip(run["losses"], ref["losses"], strict=True))
    weight_diff = max_rel_diff(run["full"], ref["full"])
    print(f"PEER EP=2 ZeRO-2: losses {run['losses']} vs {ref['losses']} (max rel {loss_diff:.1e}), "
          f"weights {weight_diff:.1e}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5
