"""MoE GPT training under DeepSpeed with expert parallelism, against one process without ZeRO.

- reference: 1 process, EP=1, ZeRO-0, micro-batch 8; the run under test: 2 processes, EP=2, ZeRO-2,
  micro-batch 4 (same global batches). Sequence-wise balancing loss on (a mean over sequences, so the split
  of sequences over ranks does not change it), clipping active. Losses and final weights must agree.
- negative control: the same run without megamoe's expert tags and marker is silently wrong (DeepSpeed
  broadcasts rank 0's experts and averages expert gradients over all ranks).
- the EP=2 checkpoint reloads with EP=1 and EP=4 and gives the same outputs.
- a 1-expert top-1 MoE GPT equals the dense GPT with the same weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import spawn, tiny_config, train_steps

STEPS = 3
MOE = ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
       "moe.router_load_balancing_type=seq_aux_loss", "moe.aux_loss_coeff=0.01", "train.clip_grad=0.05",
       f"train.train_iters={STEPS}"]


def _eval_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, 500, (4, 32), generator=gen)
    return {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(4, 32),
            "position_ids": torch.arange(32).expand(4, -1)}


def _train_several(data: dict, runs: list[tuple[list[str], str]]) -> list[dict]:
    return [_train(data, overrides, control) for overrides, control in runs]


def _train(data: dict, overrides: list[str], control: str = "") -> dict:
    """control: "untagged" (DeepSpeed is not told which parameters are experts) or "unscaled" (aux-loss
    gradient left at 1 under gradient accumulation): negative controls that must break parity."""
    from megamoe.train import deepspeed as ds
    from megamoe.train import loop
    from megamoe.train.loop import lm_loss

    if control == "untagged":
        ds.prepare_expert_parallelism = lambda *args, **kwargs: 0
    loop.aux_loss_scale = (lambda engine: 1.0) if control == "unscaled" else ds.aux_loss_scale
    run = train_steps(data, [*MOE, *overrides], STEPS)
    trainer = run.pop("trainer")
    cfg = trainer.cfg
    trainer.engine.eval()
    with torch.no_grad():
        eval_loss = lm_loss(trainer.engine, _eval_batch()).item()
    if cfg.checkpoint.save:
        from megamoe.train import saving

        saving.save(trainer.engine, cfg, trainer.progress, trainer.groups)
    local_experts = trainer.engine.module.decoder.layers[0].mlp.moe.experts.linear_fc1.detach().clone()
    return {**run, "eval_loss": eval_loss, "local_experts": local_experts}


def _load_and_evaluate(data: dict, overrides: list[str]) -> float:
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, lm_loss

    cfg = tiny_config(data, *MOE, *overrides)
    trainer = build_trainer(cfg, startup.check(cfg))
    trainer.engine.eval()
    with torch.no_grad():
        return lm_loss(trainer.engine, _eval_batch()).item()


def _one_expert_equals_dense(data: dict) -> float:
    from megamoe.models.gpt import build_model
    from megamoe.parallel.initialize import initialize

    dense_cfg = tiny_config(data)
    moe_cfg = tiny_config(data, "moe.num_experts=1", "moe.router_topk=1", "moe.router_pre_softmax=true",
                          "moe.aux_loss_coeff=0")
    groups = initialize(dense_cfg.parallel, dense_cfg.train.seed)
    dense, moe = build_model(dense_cfg, 500, groups), build_model(moe_cfg, 500, groups)
    moe_state = moe.state_dict()
    for key, value in dense.state_dict().items():
        if ".mlp.linear_fc" in key and key.endswith(".weight"):  # megatron's dense MLP -> expert 0
            key, value = key.replace(".mlp.linear_fc1.weight", ".mlp.moe.experts.linear_fc1").replace(
                ".mlp.linear_fc2.weight", ".mlp.moe.experts.linear_fc2"), value[None]
        if key in moe_state:
            moe_state[key] = value
    moe.load_state_dict(moe_state)
    batch = _eval_batch()
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool).triu(1)
    with torch.no_grad():
        outs = [m(batch["tokens"], batch["position_ids"], mask) for m in (dense, moe)]
    return ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item()


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict:
    ckpt = tmp_path_factory.mktemp("moe_ckpt")
    single = [(["train.micro_batch_size=8"], ""), (["train.micro_batch_size=4", "train.global_batch_size=8"], ""),
              (["train.micro_batch_size=4", "train.global_batch_size=8"], "unscaled")]
    out = dict(zip(["reference", "gas2", "gas2_unscaled"], spawn(_train_several, 1, tiny_data, single)[0],
                   strict=True))
    ep2 = ["train.micro_batch_size=4", "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"]
    out["ep2"] = spawn(_train, 2, tiny_data, ep2 + [f"checkpoint.save={ckpt}"])
    out["untagged"] = spawn(_train, 2, tiny_data, ep2, "untagged")
    out["tp2_ep2"] = spawn(_train, 4, tiny_data, ["train.micro_batch_size=4", "parallel.tensor_model_parallel_size=2",
                                                  "parallel.sequence_parallel=true",
                                                  "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=1"])
    load = [f"checkpoint.load={ckpt}", f"train.train_iters={STEPS + 1}"]
    out["ep1_from_ep2"] = spawn(_load_and_evaluate, 1, tiny_data, load)
    out["ep4_from_ep2"] = spawn(_load_and_evaluate, 4, tiny_data, load + [
        "parallel.expert_model_parallel_size=4", "deepspeed.zero_stage=1", "train.micro_batch_size=2"])
    out["one_expert"] = spawn(_one_expert_equals_dense, 1, tiny_data)[0]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["ep2", "tp2_ep2"])
def test_expert_parallel_training_matches_the_single_process_run(runs, layout):
    """EP=2 with ZeRO-2; TP=2 (sequence parallel) x EP=2 with ZeRO-1 (4 ranks: EP folded over TP)."""
    ref, ep2 = runs["reference"], runs[layout][0]
    loss_diff = max(abs(a - b) / b for a, b in zip(ep2["losses"], ref["losses"], strict=True))
    param_diff = max(_rel(ep2["full"][k], v) for k, v in ref["full"].items())
    print(f"losses {ep2['losses']} vs {ref['losses']}: max rel {loss_diff:.1e}; weights after {STEPS} steps: "
          f"max rel {param_diff:.1e}")
    assert loss_diff <= 1e-5 and param_diff <= 1e-5
    assert ep2["full"].keys() == ref["full"].keys()


@pytest.mark.parametrize("layout", ["ep2", "tp2_ep2"])
def test_gradient_clipping_counts_every_expert_once(runs, layout):
    """Clipping was active (norm > 0.05) and DeepSpeed's global norm equals the single-process norm."""
    ref, ep2 = runs["reference"]["grad_norms"], runs[layout][0]["grad_norms"]
    print(f"grad norms EP=2 ZeRO-2 {ep2} vs single process {ref}")
    assert all(n > 0.05 for n in ref)
    assert max(abs(a - b) / b for a, b in zip(ep2, ref, strict=True)) <= 1e-5


def test_aux_loss_gradient_is_scaled_for_gradient_accumulation(runs):
    """2 micro-batches of 4 equal 1 of 8 (sequence-wise aux loss: a mean over sequences); with the aux
    gradient left at 1 (DeepSpeed divides only the LM loss by the accumulation steps) they do not."""
    ref = runs["reference"]["full"]
    good = max(_rel(runs["gas2"]["full"][k], v) for k, v in ref.items())
    bad = max(_rel(runs["gas2_unscaled"]["full"][k], v) for k, v in ref.items())
    print(f"weights after {STEPS} steps, GAS=2 vs GAS=1: aux scaled 1/GAS {good:.1e}, unscaled {bad:.1e}")
    assert good <= 1e-5 and bad > 1e-4


def test_experts_stay_distinct_across_expert_parallel_ranks(runs):
    rank0, rank1 = (r["local_experts"] for r in runs["ep2"])
    assert not torch.allclose(rank0, rank1)


def test_untagged_experts_are_silently_wrong(runs):
    """The negative control: without the marker and tags training runs, but the experts are wrong."""
    ref, bad = runs["reference"], runs["untagged"]
    assert torch.equal(bad[0]["local_experts"], bad[1]["local_experts"]), "rank 0's experts were broadcast"
    param_diff = max(_rel(bad[0]["full"][k], v) for k, v in ref["full"].items())
    print(f"untagged run: weights differ from the reference by {param_diff:.1e}")
    assert param_diff > 1e-3


@pytest.mark.parametrize("layout", ["ep1_from_ep2", "ep4_from_ep2"])
def test_checkpoint_reloads_with_another_expert_parallel_size(runs, layout):
    want = runs["ep2"][0]["eval_loss"]
    print(f"{layout}: eval loss per rank {runs[layout]!r} vs EP=2 {want!r}")
    for got in runs[layout]:
        assert abs(got - want) / want <= 1e-6


def test_one_expert_moe_equals_the_dense_model(runs):
    assert runs["one_expert"] <= 1e-6
