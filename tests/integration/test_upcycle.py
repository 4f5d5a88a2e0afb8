"""Upcycling: a dense checkpoint -> top-k MoE and MPOE checkpoints (tools/upcycle.py's library path) whose models
give the dense model's loss at step 0 and then fine-tune from iteration 0; MPOE's frozen central tensors stay
unchanged while its auxiliary tensors train. Every stage runs in its own process (one parallel state each)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import spawn, train_steps

DENSE = ["train.train_iters=2"]
VARIANTS = {"topk": ["moe.variant=topk", "moe.num_experts=4", "moe.router_topk=2"],
            "mpo": ["moe.variant=mpo", "moe.num_experts=4"]}


def _first_batch_loss(trainer) -> float:
    from megamoe.data.loader import build_loader
    from megamoe.train.loop import lm_loss

    batch = next(iter(build_loader(trainer.datasets.train, 0, trainer.cfg, trainer.groups)))
    trainer.engine.eval()
    with torch.no_grad():
        loss = lm_loss(trainer.engine, batch).item()
    trainer.engine.train()
    return loss


def _train_dense(data: dict, save: str) -> float:
    from megamoe.train import saving

    trainer = train_steps(data, [*DENSE, f"checkpoint.save={save}"], 2)["trainer"]
    saving.save(trainer.engine, trainer.cfg, trainer.progress, trainer.groups)
    return _first_batch_loss(trainer)


def _upcycle(load: str, save: str, overrides: list[str]) -> None:
    from megamoe.convert.upcycle import upcycle

    upcycle(load, save, overrides)


def _finetune(save: str) -> dict:
    from megamoe import config
    from megamoe.data.loader import build_loader
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, train_step

    cfg = config.load(f"{save}/finetune.yaml", ["train.train_iters=3", "checkpoint.save=null"])
    trainer = build_trainer(cfg, startup.check(cfg))
    loss = _first_batch_loss(trainer)
    before = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    batches = iter(build_loader(trainer.datasets.train, 0, cfg, trainer.groups))
    for _ in range(2):  # the first step's learning rate is 0 (warm-up)
        train_step(trainer, batches)
    moved = {n: not torch.equal(p, before[n]) for n, p in trainer.engine.module.named_parameters()}
    return {"loss": loss, "iteration": trainer.progress.iteration, "moved": moved}


@pytest.fixture(scope="module")
def dense(tiny_data, tmp_path_factory) -> dict:
    save = str(tmp_path_factory.mktemp("dense") / "checkpoints")
    loss = spawn(_train_dense, 1, tiny_data, save)[0]
    return {"save": save, "loss": loss}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_upcycled_model_starts_at_the_dense_loss_and_fine_tunes(tiny_data, dense, tmp_path, variant):
    del tiny_data
    save = str(tmp_path / variant)
    spawn(_upcycle, 1, dense["save"], save, VARIANTS[variant])
    run = spawn(_finetune, 1, save)[0]
    print(f"{variant}: dense loss {dense['loss']:.6f}, upcycled {run['loss']:.6f}")
    assert run["iteration"] == 0
    assert abs(run["loss"] - dense["loss"]) <= 1e-5 * dense["loss"]
    moved = run["moved"]
    if variant == "mpo":
        assert not any(m for n, m in moved.items() if "central" in n)  # p_mask = 1: frozen
        assert all(m for n, m in moved.items() if "_aux" in n), {n: m for n, m in moved.items() if "_aux" in n}
    else:
        assert all(m for n, m in moved.items() if "experts" in n)


def test_upcycle_errors_are_one_line(tiny_data, dense, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    cases = {"moe.num_experts=4 model.hidden_size=32": "model.hidden_size differs",
             "moe.variant=peer moe.num_experts=1024": "cannot be upcycled",
             "moe.num_experts=4 moe.ffn_hidden_size=64": "keep the dense FFN's width"}
    for overrides, message in cases.items():
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "upcycle.py"), "--load", dense["save"], "--save",
                               str(tmp_path / "x"), *overrides.split()], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    del tiny_data


def _bf16_dense_weights(data: dict, save: str) -> dict:
    from megamoe.train import checkpoint, saving

    trainer = train_steps(data, [*DENSE, "train.bf16=true", "deepspeed.zero_stage=2", f"checkpoint.save={save}"],
                          2)["trainer"]
    saving.save(trainer.engine, trainer.cfg, trainer.progress, trainer.groups)
    weights = checkpoint.fp32_weights(checkpoint.latest_tag_dir(save), trainer.cfg)
    params = {n: p.detach().float() for n, p in trainer.engine.module.named_parameters()}
    return {"loss": _first_batch_loss(trainer), "has_params": set(params) <= set(weights),
            "fp32": all(weights[n].dtype == torch.float32 for n in params),
            "rel": max(((weights[n] - p).abs().max() / p.abs().max()).item() for n, p in params.items()),
            "masters_finer": any(not torch.equal(weights[n].bfloat16().float(), weights[n]) for n in params)}


def test_bf16_dense_checkpoint_upcycles_from_its_fp32_master_weights(tiny_data, tmp_path):
    """bf16 runs upcycle from ZeRO's fp32 master weights (zero_to_fp32), which round to the bf16 module's; the
    upcycled bf16 model starts at the dense loss within bf16 rounding."""
    save = str(tmp_path / "checkpoints")
    dense = spawn(_bf16_dense_weights, 1, tiny_data, save)[0]
    assert dense["has_params"] and dense["fp32"] and dense["masters_finer"], dense
    assert dense["rel"] <= 2 ** -8, dense
    spawn(_upcycle, 1, save, str(tmp_path / "topk"), VARIANTS["topk"])
    run = spawn(_finetune, 1, str(tmp_path / "topk"))[0]
    print(f"bf16 topk: dense loss {dense['loss']:.6f}, upcycled {run['loss']:.6f}")
    assert abs(run["loss"] - dense["loss"]) <= 1e-2 * dense["loss"]


def _finetune_dense(data: dict, load: str) -> dict:
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer
    from tests.helpers import tiny_config

    cfg = tiny_config(data, *DENSE, f"checkpoint.load={load}", "checkpoint.finetune=true")
    trainer = build_trainer(cfg, startup.check(cfg))
    state = trainer.engine.optimizer.state
    return {"loss": _first_batch_loss(trainer), "iteration": trainer.progress.iteration,
            "consumed": trainer.progress.consumed_samples, "optimizer_state": sum(len(s) for s in state.values())}


def test_finetune_loads_a_full_checkpoints_weights_at_iteration_0(tiny_data, dense):
    """checkpoint.finetune (Megatron's --finetune): the weights of a trained run, none of its progress."""
    run = spawn(_finetune_dense, 1, tiny_data, dense["save"])[0]
    assert run["loss"] == dense["loss"]
    assert run["iteration"] == run["consumed"] == run["optimizer_state"] == 0, run
