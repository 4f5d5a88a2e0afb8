"""The parallel grid on 4 gloo processes against one process, 3 optimizer steps of a MoE GPT (issue 9):
TP2xPP2, PP2xEP2, TP2xEP2, DP2xEP2 with ZeRO-1 and ZeRO-2, and PP2xEP2 with every MoE variant.

Every layout sees the same global batches (micro-batch 4 per data-parallel rank, 2 accumulation steps: two
micro-batches of 8 sequences in all, as the reference's) from the same initial weights (each layer seeds its
own initialisation, so a pipeline stage builds the reference's layers). Compared: the loss of every step, the
global gradient norm, every gradient of every step (summed over micro-batches, averaged over data-parallel
replicas, gathered over TP, EP and stages: tests.helpers.GradientCapture), the MoE metrics of the last step,
and the validation loss. Balancing losses are per sequence (a per-micro-batch loss would depend on how the
ranks split the micro-batch); clipping is active in every step. A gradient's relative difference is taken
against max(its norm, 1e-4 x the step's global gradient norm): a tensor whose gradient nearly cancels to zero
(CartesianMoE's mixing bias at initialisation: ~1e-8) is held to the rounding of the sums it comes from.
"""

from __future__ import annotations

import pytest

from tests.helpers import spawn

STEPS, TOL = 3, 1e-5
COMMON = ["train.train_iters=3", "train.clip_grad=0.05", "train.global_batch_size=16", "train.eval_iters=2",
          "moe.router_load_balancing_type=seq_aux_loss"]
VARIANTS = {
    "topk": ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
             "moe.shared_expert_intermediate_size=32", "moe.router_enable_expert_bias=true"],
    "dynamic_gpt": ["moe.variant=dynamic", "moe.num_experts=4", "moe.k_max=3", "moe.ffn_hidden_size=64",
                    "moe.importance_mode=predicted"],
    "dynamic_encoder": ["moe.variant=dynamic", "moe.num_experts=4", "moe.k_max=3", "moe.ffn_hidden_size=64",
                        "model.objective=masked_lm"],
    "peer": ["moe.variant=peer", "moe.num_experts=256", "moe.num_heads=2", "moe.topk_per_head=4",
             "moe.key_dim=16", "moe.layer_freq=[1,1]"],
    "cartesian": ["moe.variant=cartesian", "moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
                  "moe.shared_expert_intermediate_size=64"],
    "mpo": ["moe.variant=mpo", "moe.num_experts=4", "moe.ffn_hidden_size=48", "moe.aux_init_noise_std=0.02"],
}
PP2_EP2 = ["parallel.pipeline_model_parallel_size=2", "parallel.expert_model_parallel_size=2"]
LAYOUTS = {  # name: (variant, layout overrides)
    "tp2_pp2": ("topk", ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                         "parallel.sequence_parallel=true", "train.micro_batch_size=8", "deepspeed.zero_stage=1"]),
    "tp2_ep2": ("topk", ["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2",
                         "parallel.sequence_parallel=true", "train.micro_batch_size=4", "deepspeed.zero_stage=2"]),
    "dp2_ep2_zero1": ("topk", ["parallel.expert_model_parallel_size=2", "train.micro_batch_size=2",
                               "deepspeed.zero_stage=1"]),
    "dp2_ep2_zero2": ("topk", ["parallel.expert_model_parallel_size=2", "train.micro_batch_size=2",
                               "deepspeed.zero_stage=2"]),
    **{f"pp2_ep2_{v}": (v, [*PP2_EP2, "train.micro_batch_size=4", "deepspeed.zero_stage=2"]) for v in VARIANTS},
}


def _run(data: dict, runs: list[tuple[str, list[str]]]) -> dict | None:
    """Per run: losses, gradient norms, gradients of every step, last-step MoE metrics, validation loss."""
    import torch.distributed as dist

    from megamoe.data.loader import build_loader
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, evaluate, train_step
    from megamoe.train.metrics import collect_moe_metrics
    from tests.helpers import GradientCapture, tiny_config

    out = {}
    for name, overrides in runs:
        cfg = tiny_config(data, *COMMON, *overrides)
        trainer = build_trainer(cfg, startup.check(cfg))
        capture, grads, losses, norms = GradientCapture(trainer), [], [], []
        batches = iter(build_loader(trainer.datasets.train, 0, cfg, trainer.groups))

        def keep_grads(engine, grads=grads, capture=capture) -> None:
            grads.append(capture.step())

        for _ in range(STEPS):
            values = train_step(trainer, batches, keep_grads)
            losses.append(values["train/loss"])
            norms.append(values["train/grad_norm"])
        metrics = collect_moe_metrics(trainer.engine.module, trainer.groups)[0]
        out[name] = {"losses": losses, "grad_norms": norms, "grads": grads, "metrics": metrics,
                     "valid_loss": evaluate(trainer)["valid/loss"]}
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def results(tiny_data) -> dict:
    references = [(f"reference_{v}", [*ov, "train.micro_batch_size=8", "deepspeed.zero_stage=1"])
                  for v, ov in VARIANTS.items()]
    layouts = [(name, [*VARIANTS[variant], *ov]) for name, (variant, ov) in LAYOUTS.items()]
    # Both inside the first test's 1200 s (pytest.ini's timeout counts fixture set-up).
    return {**spawn(_run, 1, tiny_data, references, timeout=300)[0],
            **spawn(_run, 4, tiny_data, layouts, timeout=840)[0]}


def _rel(a, b, floor: float) -> float:
    return ((a - b).norm() / b.norm().clamp(min=floor)).item()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_equals_one_process(results, layout):
    run, ref = results[layout], results[f"reference_{LAYOUTS[layout][0]}"]
    worst = {}
    for what in ("losses", "grad_norms"):
        worst[what] = max(abs(g - w) / abs(w) for g, w in zip(run[what], ref[what], strict=True))
        assert worst[what] <= TOL, f"{what}: {run[what]} vs {ref[what]}"
    assert all(norm > 0.05 for norm in ref["grad_norms"]), "clipping must be active in every step"
    worst_grad = 0.0
    for step, (got, want) in enumerate(zip(run["grads"], ref["grads"], strict=True), 1):
        assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:5]
        floor = 1e-4 * sum(t.square().sum() for t in want.values()).sqrt().item()
        for name, tensor in want.items():
            worst_grad = max(worst_grad, rel := _rel(got[name], tensor, floor))
            assert rel <= TOL, f"step {step} {name}: gradient rel. diff {rel:.2e}"
    assert run["metrics"].keys() == ref["metrics"].keys()
    for key, value in ref["metrics"].items():  # per-layer balancing losses, loads, experts per token
        assert abs(run["metrics"][key] - value) <= TOL * max(1.0, abs(value)), key
    assert abs(run["valid_loss"] - ref["valid_loss"]) <= TOL * ref["valid_loss"]
    print(f"{layout}: max rel loss diff {worst['losses']:.1e}, grad norm {worst['grad_norms']:.1e}, "
          f"max rel gradient diff {worst_grad:.1e} over {len(ref['grads'][0])} tensors x {STEPS} steps")
