"""Config tree: YAML + overrides, round trip, and configuration mistakes reported in one line by the
launcher before any process group exists."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch.distributed as dist

from megamoe import config
from tests.helpers import ROOT

DEMO = str(ROOT / "configs" / "tiny-dense.yaml")


def data_args(data: dict) -> list[str]:
    """The test corpus, and run directories in the session's temporary directory (start-up creates them)."""
    return [f"data.data_path=[{data['prefix']}]", f"data.tokenizer_model={data['tokenizer']}",
            f"logging.log_dir={data['root']}/runs/demo", f"checkpoint.save={data['root']}/runs/demo/checkpoints"]


def test_yaml_and_overrides(tiny_data):
    cfg = config.load(DEMO, [*data_args(tiny_data), "train.lr=1e-3",
                             "deepspeed.extra.zero_optimization.overlap_comm=true",
                             "parallel.tensor_model_parallel_size=2", "model.num_query_groups=null"])
    assert cfg.model.num_layers == 4 and cfg.train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert cfg.deepspeed.extra == {"zero_optimization": {"overlap_comm": True}}
    assert cfg.model.num_query_groups is None and cfg.parallel.tensor_model_parallel_size == 2


def test_dump_round_trip(tiny_data, tmp_path):
    cfg = config.load(DEMO, data_args(tiny_data))
    path = tmp_path / "resolved.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(path) == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path, tiny_data):
    cfg = config.load(path, data_args(tiny_data) + ["model.vocab_size=null"])
    dp = (cfg.train.global_batch_size or cfg.train.micro_batch_size) // cfg.train.micro_batch_size
    world = dp * cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    env = config.Environment(world_size=world, cuda_available=True, tokenizer_vocab_size=512)
    config.validate(cfg, env)


# (overrides, WORLD_SIZE, expected message) - each a distinct mistake a user makes.
MISTAKES = [
    (["model.hiden_size=64"], 1, r"unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'\?"),
    (["modle.num_layers=2"], 1, r"unknown config key 'modle'; did you mean 'model'\?"),
    (["train.train_iters=ten"], 1, r"config key 'train.train_iters' must be an int, got 'ten'"),
    (["model.num_layers=true"], 1, r"config key 'model.num_layers' must be an int, got True"),
    (["model.normalization=BatchNorm"], 1, r"'model.normalization' must be one of 'RMSNorm', 'LayerNorm'"),
    (["deepspeed.zero_stage=4"], 1, r"'deepspeed.zero_stage' must be one of 0, 1, 2, 3; got 4"),
    (["train.lr"], 1, r"override 'train.lr' is not of the form section.key=value"),
    (["train.lr.peak=1"], 1, r"override 'train.lr.peak=1': 'train.lr' is a value, not a section"),
    (["parallel.tensor_model_parallel_size=3"], 3,
     r"model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3"),
    (["parallel.tensor_model_parallel_size=2"], 3, r"world size 3 is not divisible by TP x PP = 2 x 1"),
    (["model.num_query_groups=3"], 1, r"model.num_attention_heads=4 is not divisible by model.num_query_groups=3"),
    (["parallel.pipeline_model_parallel_size=3"], 3,
     r"model.num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=3"),
    (["parallel.pipeline_model_parallel_size=2"], 2,
     r"deepspeed.zero_stage=0 with parallel.pipeline_model_parallel_size=2: use ZeRO 1 or 2"),
    (["parallel.pipeline_model_parallel_size=2", "deepspeed.zero_stage=1",
      "model.untie_embeddings_and_output_weights=false"], 2,
     r"untie_embeddings_and_output_weights=false with pipeline parallelism: .* on different stages"),
    (["train.global_batch_size=12"], 1, r"train.global_batch_size=12 is not a multiple of micro_batch_size x "
                                        r"data-parallel size = 8 x 1 = 8"),
    (["model.vocab_size=500"], 1, r"model.vocab_size=500 is smaller than the tokenizer .* \(512 tokens\)"),
    (["data.tokenizer_model=/nonexistent/spm.model"], 1, r"data.tokenizer_model: '/nonexistent/spm.model' does not"),
    (["data.data_path=[/nonexistent/corpus_text_document]"], 1,
     r"data.data_path: '/nonexistent/corpus_text_document.bin' does not exist"),
    (["data.data_path=[0.5, a, b]"], 1, r"must be \[prefix\] or \[weight, prefix, weight, prefix, ...\]"),
    (["data.split=90,10"], 1, r"data.split='90,10' must be three non-negative numbers"),
    (["data.split=100,0,0"], 1, r"leaves no validation data but train.eval_iters=8"),
    (["train.bf16=true", "train.fp16=true"], 1, r"train.bf16 and train.fp16 are both true"),
    (["train.fp16=true"], 1, r"train.fp16=true needs CUDA"),
    (["train.lr_warmup_iters=500"], 1, r"train.lr_warmup_iters=500 must be at least 0 and less than the decay "
                                       r"length 300"),
    (["train.lr_warmup_iters=300"], 1, r"train.lr_warmup_iters=300 must be at least 0 and less than the decay "
                                       r"length 300 .*; lower the warm-up or train longer$"),  # megatron asserts <
    (["train.min_lr=0.1"], 1, r"0 <= train.min_lr <= train.lr"),
    (["logging.peak_tflops=0"], 1, r"logging.peak_tflops=0.0 must be > 0"),
    (["logging.profile_steps=[5, 3]"], 1, r"logging.profile_steps=\[5, 3\] must be \[first, last\] with 1 <= first "
                                          r"<= last <= train.train_iters \(300\), or null"),
    (["logging.profile_steps=[299, 301]"], 1, r"logging.profile_steps=\[299, 301\] must be \[first, last\]"),
    (["deepspeed.extra.train_batch_size=8"], 1, r"deepspeed.extra.train_batch_size is generated by megamoe; "
                                                r"set train.global_batch_size instead"),
    (["model.max_position_embeddings=64"], 1, r"data.seq_length=128 exceeds model.max_position_embeddings=64"),
    (["model.hidden_size=36"], 1, r"head dimension 9 is odd"),
    (["moe.variant=unknown"], 1, r"moe.variant=.unknown. is unknown; choose one of (\w+, )+topk$"),
    (["parallel.expert_model_parallel_size=2"], 2, r"expert_model_parallel_size=2 needs MoE layers"),
    (["moe.num_experts=6", "parallel.expert_model_parallel_size=4", "deepspeed.zero_stage=1",
      "train.micro_batch_size=4"], 4,
     r"moe.num_experts=6 is not divisible by parallel.expert_model_parallel_size=4"),
    (["moe.num_experts=4", "moe.router_topk=5"], 1, r"moe.router_topk=5 must be between 1 and moe.num_experts=4"),
    (["moe.num_experts=4", "moe.router_topk=1"], 1,
     r"moe.router_topk=1 with moe.router_pre_softmax=false .* the router would get no gradient from the LM loss"),
    (["moe.variant=cartesian", "moe.num_experts=4", "moe.router_topk=1"], 1,
     r"moe.router_topk=1 with moe.router_pre_softmax=false .* CartesianMoE authors' top-1 gate\)$"),
    (["moe.num_experts=4", "parallel.tensor_model_parallel_size=2"], 2, r"need parallel.sequence_parallel=true"),
    (["moe.num_experts=4", "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=3"], 2,
     r"deepspeed.zero_stage=3 with MoE layers is not supported"),
    (["moe.num_experts=4", "deepspeed.zero_stage=3"], 1, r"deepspeed.zero_stage=3 with MoE layers is not supported: "
     r".*use deepspeed.zero_stage=1 or 2"),
    (["moe.num_experts=4", "parallel.expert_model_parallel_size=2"], 2,
     r"deepspeed.zero_stage=0 with expert parallelism and train.clip_grad > 0"),
    (["moe.num_experts=4", "moe.layer_freq=[1, 0]"], 1, r"moe.layer_freq=\[1, 0\] must be a list of 4 zeros and ones"),
    (["moe.num_experts=4", "moe.pad_expert_input_to_capacity=true"], 1,
     r"pad_expert_input_to_capacity=true needs moe.expert_capacity_factor"),
    (["moe.variant=dynamic", "moe.num_experts=4"], 1,
     r"moe.importance_mode='attention_received' needs bidirectional self-attention, .* computed from future "
     r"tokens; .* Use moe.importance_mode=predicted"),
    (["moe.variant=dynamic", "moe.num_experts=4", "moe.importance_mode=predicted", "moe.budget=batch"], 1,
     r"moe.budget=batch .* depends on later tokens"),
    (["moe.variant=dynamic", "moe.num_experts=4", "moe.importance_mode=predicted", "moe.budget=batch",
      "model.objective=masked_lm"], 1,
     r"moe.budget=batch with moe.importance_mode=predicted: the batch budget ranks the attention importance"),
    (["moe.variant=dynamic", "moe.num_experts=4", "model.objective=masked_lm", "moe.k_max=5"], 1,
     r"k_max=5 must satisfy 0 <= k_min <= k_max <= moe.num_experts=4"),
    (["moe.variant=peer", "moe.num_experts=1000"], 1, r"moe.num_experts=1000 must be a perfect square .* 961 or 1024"),
    (["moe.variant=peer", "moe.num_experts=1024", "moe.key_dim=33"], 1, r"moe.key_dim=33 must be even"),
    (["moe.variant=peer", "moe.num_experts=1024", "moe.topk_per_head=40"], 1,
     r"moe.topk_per_head=40 must be between 1 and sqrt\(moe.num_experts\)=32"),
    (["moe.variant=peer", "moe.num_experts=1024", "parallel.expert_model_parallel_size=3", "deepspeed.zero_stage=1",
      "train.global_batch_size=24"], 3,
     r"moe.num_experts=1024 is not divisible by parallel.expert_model_parallel_size=3"),
    (["moe.variant=peer", "moe.num_experts=1024", "moe.expert_capacity_factor=1.0"], 1,
     r"do not apply to PEER"),
    (["moe.num_experts=6", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
      "parallel.expert_model_parallel_size=3", "deepspeed.zero_stage=1", "train.global_batch_size=24"], 6,
     r"expert_model_parallel_size=3 with tensor_model_parallel_size=2: use EP=1 or a multiple of 2"),
    (["checkpoint.keep_last=0"], 1, r"checkpoint.keep_last=0 must be >= 1 \(or null to keep every checkpoint\)"),
    (["checkpoint.load=configs/tiny-dense.yaml"], 1, r"checkpoint.load='configs/tiny-dense.yaml' is a file"),
    (["train.max_skipped_steps=0"], 1, r"train.max_skipped_steps=0 must be >= 1"),
    (["checkpoint.verify=md5"], 1, r"'checkpoint.verify' must be one of 'hashes', 'sizes', 'none'"),
    (["parallel.step_timeout_minutes=0"], 1, r"parallel.step_timeout_minutes=0.0 must be > 0 \(null: no limit\)"),
    (["parallel.distributed_timeout_minutes=-1"], 1, r"parallel.distributed_timeout_minutes=-1.0 must be > 0"),
    # Values that passed validation and failed later (a traceback on every rank, or a silent fallback).
    (["model.ffn_hidden_size=0"], 1, r"model.ffn_hidden_size=0 must be >= 1, or null for the default"),
    (["model.num_query_groups=0"], 1, r"model.num_query_groups=0 must be >= 1"),
    (["model.kv_channels=0"], 1, r"model.kv_channels=0 must be >= 1"),
    (["model.make_vocab_size_divisible_by=0"], 1, r"model.make_vocab_size_divisible_by=0 must be positive"),
    (["model.init_method_std=-0.02"], 1, r"model.init_method_std=-0.02 must be > 0"),
    (["model.rotary_base=0"], 1, r"model.rotary_base=0 must be > 0"),
    (["model.norm_epsilon=0"], 1, r"model.norm_epsilon=0.0 must be > 0"),
    (["train.seed=-1"], 1, r"train.seed=-1 must be in \[0, 2\*\*32\)"),
    (["train.seed=4294967296"], 1, r"train.seed=4294967296 must be in \[0, 2\*\*32\)"),
    (["train.adam_beta1=1.5"], 1, r"train.adam_beta1=1.5 must be in \[0, 1\)"),
    (["train.adam_beta2=1.0"], 1, r"train.adam_beta2=1.0 must be in \[0, 1\)"),
    (["train.weight_decay=-0.1"], 1, r"train.weight_decay=-0.1 >= 0"),
    (["train.adam_eps=0"], 1, r"train.adam_eps=0.0 must be > 0"),
    (["train.lr=nan"], 1, r"config key 'train.lr' must be a finite number, got 'nan'"),
    (["moe.num_experts=4", "moe.aux_loss_coeff=.nan"], 1, r"'moe.aux_loss_coeff' must be a finite number"),
    (["data.data_path=[nan, a, 1, b]"], 1, r"data.data_path weights \[nan, 1.0\] must be positive numbers"),
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "data.seq_length=127"], 2,
     r"data.seq_length=127 is not divisible by parallel.tensor_model_parallel_size=2"),
    (["parallel.distributed_timeout_minutes=0.0001"], 1, r"distributed_timeout_minutes=0.0001 is too short"),
    (["checkpoint.save="], 1, r"checkpoint.save='' is empty; give a path \(or null\)"),
    (["logging.log_dir=configs/tiny-dense.yaml"], 1,
     r"logging.log_dir=configs/tiny-dense.yaml cannot be created \(configs/tiny-dense.yaml is a file\)"),
    (["checkpoint.save=configs/tiny-dense.yaml/ckpt"], 1, r"cannot be created \(configs/tiny-dense.yaml is a file\)"),
    (["data.data_cache_path=/proc/megamoe-cache"], 1, r"data.data_cache_path=/proc/megamoe-cache cannot be created"),
    (["data.tokenizer_model=configs"], 1, r"data.tokenizer_model: 'configs' is a directory"),
    (["data.tokenizer_model=configs/tiny-dense.yaml"], 1,
     r"data.tokenizer_model: 'configs/tiny-dense.yaml' is not a sentencepiece model"),
    (["deepspeed.extra={zero_optimization: {reduce_bucket_size: big}}"], 1,
     r"DeepSpeed refuses it: 1 validation error for DeepSpeedZeroConfig reduce_bucket_size Input should be a "
     r"valid integer"),
    (["data.seq_length=4096", "model.max_position_embeddings=4096", "train.micro_batch_size=512",
      "train.global_batch_size=512"], 1,
     r"this run needs about [\d,.]+ GiB per rank .* more than the [\d,.]+ GiB a rank has here"),
    (["data.seq_length=100000000", "model.max_position_embeddings=100000000"], 1,
     r"the training split of .* holds \d+ tokens, less than one sample of data.seq_length=100000000"),
    (["data.split=100,0.0001,0"], 1, r"data.split='100,0.0001,0' gives the validation split of .* no document"),
    (["checkpoint.load=/nonexistent/run"], 1, r"checkpoint error: checkpoint.load=/nonexistent/run does not exist"),
    (["logging.log_dir="], 1, r"logging.log_dir='' is empty; give a path$"),
    (["train.train_iters=100000000"], 1, r"train.train_iters=100000000 asks for 1,600,000,000 samples of .*: "
                                         r"megatron's sample index for them needs about [\d,]+ GiB, more than"),
    (["train.eval_iters=1000000000"], 1, r"train.eval_iters=1000000000 asks for 8,000,000,000 samples"),
    (["moe.num_experts=4", "moe.router_enable_expert_bias=true", "moe.router_bias_update_rate=-1"], 1,
     r"moe.router_bias_update_rate=-1.0 must be >= 0"),
]


def test_at_least_thirty_distinct_mistakes_are_covered():
    assert len(MISTAKES) >= 30 and len({m[2] for m in MISTAKES}) == len(MISTAKES)


@pytest.mark.parametrize("overrides, world_size, message", MISTAKES, ids=[m[2][:40] for m in MISTAKES])
def test_mistake_is_one_line_before_any_process_group(overrides, world_size, message, tiny_data, monkeypatch,
                                                       capsys):
    from launchers.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    args = ["--config", DEMO, *data_args(tiny_data), *overrides]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not dist.is_initialized()


def test_missing_config_file(capsys):
    from launchers.pretrain import main

    assert main(["--config", "configs/nope.yaml"]) == 2
    assert "config file 'configs/nope.yaml' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_a_config_that_is_not_a_yaml_file(kind, tmp_path, capsys):
    from launchers.pretrain import main

    path = tmp_path / "c.yaml"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.mkdir()
    assert main(["--config", str(path)]) == 2
    expected = "is not a text file (not UTF-8)" if kind == "binary" else "is a directory; pass a YAML file"
    assert expected in capsys.readouterr().err


def test_an_unknown_deepspeed_key_is_named(tiny_data, monkeypatch, caplog):
    """DeepSpeed ignores a top-level key it does not know (a typo, say): start-up names it."""
    from megamoe.train import startup

    cfg = config.load(DEMO, [*data_args(tiny_data), "deepspeed.extra={zero_optimisation: {overlap_comm: true}}"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    warnings = []
    monkeypatch.setattr(startup, "get_logger", lambda: type("L", (), {"warning": warnings.append})())
    startup.check(cfg)
    assert warnings == ["deepspeed.extra.zero_optimisation is not a DeepSpeed setting: DeepSpeed ignores it (a typo?)"]


def test_bad_yaml_names_the_line(tmp_path, capsys):
    from launchers.pretrain import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 2\n  hidden_size: [64\n")
    assert main(["--config", str(bad)]) == 2
    assert re.search(r"config file '.*bad.yaml' line \d+ is not valid YAML", capsys.readouterr().err)


def test_launcher_process_prints_one_line_and_exits_2(tiny_data):
    """The real entry point, as a user runs it: exit status 2, one line, no traceback, nothing started."""
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "pretrain.py"), "--config", DEMO,
                           *data_args(tiny_data), "model.hiden_size=64"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "megamoe: config error: unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'?"]
