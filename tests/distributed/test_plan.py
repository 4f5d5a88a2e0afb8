"""tools/plan.py's predictions against measured CPU runs (issue 9: within 10 %; a checkpoint's bytes per kind of file:
within 5 %), and its parameter counts against every variant's real layers.

Measured on each rank of a real run (gloo, fp32, 2 micro-batches per step): the weights (the module's
parameters), the gradients DeepSpeed holds after a step's first backward or at its accumulation boundary,
whichever is more (ZeRO 0-1: every parameter's accumulating gradient; ZeRO-2: its reduced fp32 partitions; its
reduction bucket is scratch space, not counted), the optimizer states (Adam's
moments and DeepSpeed's fp32 partitions), the activations one micro-batch saves for backward (saved-tensor hooks,
each storage once, parameters excluded), and the all-to-all bytes per step sent to other ranks
(megamoe.parallel.comm.metered). Ranks of a stage agree; the pipeline's stages are compared one by one.
"""

from __future__ import annotations

import pytest

from tests.helpers import spawn

TOL = 0.10
MOE = ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64"]
CONFIGS = {  # name: (world size, overrides)
    "dense_tp2_zero1": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                            "train.micro_batch_size=4", "train.global_batch_size=8", "deepspeed.zero_stage=1"]),
    "topk_ep2_zero2": (2, [*MOE, "parallel.expert_model_parallel_size=2", "train.micro_batch_size=4",
                           "train.global_batch_size=16", "deepspeed.zero_stage=2"]),
    "topk_pp2_ep2_zero1": (4, [*MOE, "parallel.pipeline_model_parallel_size=2",
                               "parallel.expert_model_parallel_size=2", "train.micro_batch_size=4",
                               "train.global_batch_size=16", "deepspeed.zero_stage=1"]),
}
FIELDS = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "a2a_bytes_per_step")


def _measure(data: dict, overrides: list[str]) -> dict | None:
    """Per stage (from its first rank): the measured bytes and the plan's prediction."""
    import torch
    import torch.distributed as dist

    from megamoe.data.loader import build_loader
    from megamoe.data.tokenizer import spm_vocab_size
    from megamoe.moe import plan
    from megamoe.parallel.comm import metered
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, stage_output, train_step
    from tests.helpers import tiny_config

    cfg = tiny_config(data, *overrides)
    trainer = build_trainer(cfg, startup.check(cfg))
    engine, groups = trainer.engine, trainer.groups
    batches = iter(build_loader(trainer.datasets.train, 0, cfg, groups))
    train_step(trainer, batches)  # the optimizer states exist after the first step
    grads, backward = [], engine.backward

    def held_gradients(*_) -> None:
        held = [p.grad for p in engine.module.parameters() if p.grad is not None]
        partitions = getattr(engine.optimizer, "averaged_gradients", None) or {}
        grads.append(_storage_bytes(held + [g for group in partitions.values() for g in group or [] if g is not None]))

    def backward_and_measure(*args, **kwargs):
        out = backward(*args, **kwargs)
        if not grads:  # after the step's first backward
            held_gradients()
        return out

    engine.backward = backward_and_measure
    with metered() as meter:
        train_step(trainer, batches, held_gradients)  # and at the accumulation boundary
    measured = {"params_bytes": _storage_bytes(list(engine.module.parameters())),
                "grads_bytes": max(grads), "optimizer_bytes": _optimizer_bytes(engine),
                "a2a_bytes_per_step": meter.to_other_ranks}
    if groups.pp_size == 1:  # a stage of a pipeline gets its input from the schedule
        params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stage_output(trainer, next(batches), None)
        measured["activations_bytes"] = sum(saved.values())
    vocab = spm_vocab_size(cfg.data.tokenizer_model)
    predicted = plan.plan(cfg, dist.get_world_size(), vocab)[groups.pp_rank]
    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, (groups.pp_rank, measured, {f: getattr(predicted, f) for f in FIELDS}))
    return {stage: (m, p) for stage, m, p in reversed(stages)} if dist.get_rank() == 0 else None


def _storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _optimizer_bytes(engine) -> int:
    tensors = [t for state in engine.optimizer.state.values() for t in state.values() if hasattr(t, "untyped_storage")]
    tensors += list(getattr(engine.optimizer, "single_partition_of_fp32_groups", []))
    return _storage_bytes(tensors)


@pytest.fixture(scope="module")
def measurements(tiny_data) -> dict:
    return {name: spawn(_measure, world, tiny_data, overrides)[0] for name, (world, overrides) in CONFIGS.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_is_within_ten_percent_of_the_measurement(measurements, name):
    for stage, (measured, predicted) in sorted(measurements[name].items()):
        for field, value in measured.items():
            want = predicted[field]
            error = abs(want - value) / max(value, 1)
            print(f"{name} stage {stage} {field}: predicted {want:,} measured {value:,} ({100 * error:+.1f} %)")
            assert error <= TOL or (value == 0 and want == 0), f"stage {stage} {field}: {want:,} vs {value:,}"


VARIANTS = {
    "topk": ["moe.num_experts=4", "moe.router_topk=2", "moe.shared_expert_intermediate_size=32",
             "moe.shared_expert_combine=residual", "moe.router_bias=true"],
    "dynamic": ["moe.variant=dynamic", "moe.num_experts=4", "moe.importance_mode=predicted"],
    "peer": ["moe.variant=peer", "moe.num_experts=256", "moe.num_heads=2", "moe.topk_per_head=4", "moe.key_dim=16"],
    "cartesian": ["moe.variant=cartesian", "moe.num_experts=4", "moe.ffn_hidden_size=32",
                  "moe.shared_expert_intermediate_size=32"],
    "mpo": ["moe.variant=mpo", "moe.num_experts=4", "moe.ffn_hidden_size=48"],
    "gpt2_dense": ["model.normalization=LayerNorm", "model.swiglu=false", "model.add_bias_linear=true",
                   "model.position_embedding_type=learned_absolute", "model.untie_embeddings_and_output_weights=false"],
}


def _counts(data: dict, overrides: list[str]) -> tuple[tuple[int, int], tuple[int, int]]:
    from megamoe.data.tokenizer import spm_vocab_size
    from megamoe.models.gpt import build_model
    from megamoe.moe import plan
    from megamoe.moe.experts import Experts
    from megamoe.parallel.initialize import initialize
    from tests.helpers import tiny_config

    cfg = tiny_config(data, *overrides)
    vocab = spm_vocab_size(cfg.data.tokenizer_model)
    model = build_model(cfg, vocab, initialize(cfg.parallel, cfg.train.seed))
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    layout = plan.ClusterLayout(world_size=1, tp=1, pp=1, ep=1)
    sized = plan.dataclasses.replace(cfg, model=plan.dataclasses.replace(cfg.model, vocab_size=vocab))
    return (sum(p.numel() for p in model.parameters()) - experts, experts), plan.stage_params(sized, layout, 0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_counts_equal_the_built_model(tiny_data, name):
    built, planned = spawn(_counts, 1, tiny_data, VARIANTS[name])[0]
    assert planned == built, f"planned (dense, expert) {planned} vs built {built}"


CHECKPOINT_PARTS = {  # the plan's parts: the checkpoint's files holding them
    "model files": "mp_rank_*_model_states.pt", "expert shards": "experts_ep*.pt",
    "optimizer": "optimizer_any_layout/*.distcp"}
CHECKPOINT_TOL = 0.05  # file overhead beside the tensor data (pickled names, DCP records): 1-3 % at 0.4 M parameters


def _save_checkpoint(data: dict, save: str, overrides: list[str]) -> int:
    from megamoe.data.tokenizer import spm_vocab_size
    from tests.helpers import run_training

    run_training(data, "train.train_iters=2", "checkpoint.save_interval=1", f"checkpoint.save={save}", *overrides)
    return spm_vocab_size(data["tokenizer"])


@pytest.mark.parametrize("name", ["dense_tp2_zero1", "topk_ep2_zero2"])
def test_checkpoint_bytes_match_the_files_written(tiny_data, tmp_path, name):
    from pathlib import Path

    from megamoe.config import load
    from megamoe.moe import plan
    from tests.helpers import tiny_overrides

    world, overrides = CONFIGS[name]
    overrides = [*overrides, "model.hidden_size=128", "model.ffn_hidden_size=256"]
    vocab = spawn(_save_checkpoint, world, tiny_data, str(tmp_path), overrides)[0]
    predicted = plan.checkpoint_plan(load(None, [*tiny_overrides(tiny_data), *overrides]), world, vocab).parts
    tag = Path(tmp_path) / "iter_0000001"
    assert not list(tag.glob("*optim_states.pt")), "the optimizer state is written once, not in DeepSpeed's files too"
    for part, pattern in CHECKPOINT_PARTS.items():
        written = sum(p.stat().st_size for p in tag.glob(pattern))
        print(f"{name}: {part}: {written:,} bytes written, {predicted[part]:,} predicted")
        if predicted[part] == 0:
            assert written == 0, part
        else:
            assert abs(written / predicted[part] - 1) <= CHECKPOINT_TOL, (part, written, predicted[part])
