"""MPOE under expert parallelism against one process (fp32, gloo): the layer with EP=2 (outputs, input, auxiliary,
central and router gradients), and the whole model for 3 steps with EP=2 + ZeRO-2 and the central-gradient mask
on (p_mask=0.5), with 1 and 2 micro-batches per step: equal losses and weights, central replicas bit-identical,
only auxiliary tensors expert-tagged, one matrix rebuild per layer and step."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import max_rel_diff, spawn, train_steps

D, TOKENS_PER_RANK = 16, 12
MPOE = ["moe.variant=mpo", "moe.num_experts=4", "moe.ffn_hidden_size=48", "moe.p_mask=0.5",
        "moe.aux_init_noise_std=0.02", "moe.router_load_balancing_type=seq_aux_loss", "train.train_iters=3",
        "train.clip_grad=0.05"]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _layer_parity() -> dict[str, float]:
    import torch.distributed as dist

    from megamoe.config import ParallelConfig
    from megamoe.moe import LayerShape, build_moe
    from megamoe.parallel.groups import ParallelGroups
    from megamoe.parallel.initialize import initialize
    from megamoe.variants.mpo import MPOEMoEConfig

    groups = initialize(ParallelConfig(expert_model_parallel_size=2), seed=7)
    cfg = MPOEMoEConfig(num_experts=4, aux_loss_coeff=0.0, p_mask=0.0, aux_init_noise_std=0.05)
    shape = LayerShape(hidden_size=D, ffn_hidden_size=24, swiglu=True, init_std=0.2, num_layers=2, layer_number=1,
                       seed=3)
    reference, sharded = build_moe(cfg, shape, ParallelGroups.single_process()), build_moe(cfg, shape, groups)
    sharded.router.load_state_dict(reference.router.state_dict())  # drawn from the global stream
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
    rows = slice(sharded.experts.first_expert, sharded.experts.first_expert + sharded.experts.num_local)
    for name, param in sharded.experts.named_parameters():
        diffs[f"{name} grad"] = _rel(param.grad, dict(reference.experts.named_parameters())[name].grad[rows])
    for name, param in [*sharded.mpo.named_parameters(), *sharded.router.named_parameters()]:
        grad = param.grad.clone()
        dist.all_reduce(grad)  # each rank's part: its tokens (DeepSpeed's data-parallel reduction)
        want = dict([*reference.mpo.named_parameters(), *reference.router.named_parameters()])[name].grad
        diffs[f"{name} grad"] = _rel(grad, want)
    return diffs


def test_expert_parallel_layer_matches_one_process():
    for rank, diffs in enumerate(spawn(_layer_parity, 2)):
        print("rank", rank, {k: f"{v:.1e}" for k, v in diffs.items()})
        for key, value in diffs.items():
            assert value <= 1e-5, f"rank {rank}: {key} differs by {value:.2e}"


def _train(data: dict, overrides: list[str]) -> dict:
    import torch.distributed as dist

    run = train_steps(data, [*MPOE, *overrides], 3)
    trainer = run.pop("trainer")
    centrals = {n: p for n, p in trainer.engine.module.named_parameters() if "central" in n}
    gathered = {}
    for name, param in centrals.items():
        copies = [torch.empty_like(param) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, param.detach().contiguous())
        gathered[name] = copies
    run["central_replicas_equal"] = all(torch.equal(c[0], c[-1]) for c in gathered.values())
    run["tags"] = {n: getattr(p, "allreduce", True) for n, p in trainer.engine.module.named_parameters()
                   if ".mpo." in n or "_aux" in n}
    run["rebuilds"] = [m.experts.rebuilds for m in trainer.engine.module.modules() if hasattr(m, "mpo")]
    return run


@pytest.mark.parametrize("micro_batch", [4, 2], ids=["ga1", "ga2"])
def test_training_matches_one_process(tiny_data, micro_batch):
    """With 2 micro-batches per step (ga2) the experts' matrices are still rebuilt once per step: the earlier
    micro-batch's gradient reaches the MPO tensors through the last one's backward."""
    reference = spawn(_train, 1, tiny_data, ["train.micro_batch_size=8"])[0]
    run = spawn(_train, 2, tiny_data, [f"train.micro_batch_size={micro_batch}", "train.global_batch_size=8",
                                       "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"])[0]
    assert run["rebuilds"] == reference["rebuilds"] == [3, 3]  # 3 steps, 2 layers
    loss_diff = max(abs(a - b) / b for a, b in zip(run["losses"], reference["losses"], strict=True))
    weight_diff = max_rel_diff(run["full"], reference["full"])
    print(f"losses {run['losses']} vs {reference['losses']} (max rel {loss_diff:.1e}), weights {weight_diff:.1e}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5
    assert run["central_replicas_equal"]
    assert {n: t for n, t in run["tags"].items() if "central" in n} == {n: True for n in run["tags"] if "central" in n}
    assert not any(t for n, t in run["tags"].items() if "_aux" in n)
