"""The probe's own cases: other keys, tools, signals and file-system faults of the same kinds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.probe.harness import (
    CORPUS,
    LONG_RUN,
    TIMEOUT_S,
    Ctx,
    case,
    dataset_with,
    end_check,
    latest_check,
    processes_under,
    signal_group,
    signal_runner,
    simple,
    steps_lost,
    stop_check,
    summarise,
    wait_for_step,
)

# -- new cases (this probe) --
for key, value, what in [
        ("train.lr", "nan", "a NaN learning rate"), ("moe.aux_loss_coeff", "nan", "a NaN balancing-loss weight"),
        ("train.clip_grad", "nan", "a NaN clipping threshold"), ("train.adam_eps", "0", "Adam epsilon 0"),
        ("train.adam_eps", "-1e-8", "a negative Adam epsilon"), ("train.train_iters", "100000000",
                                                                  "10^8 steps (megatron's sample index: 6 GB)"),
        ("train.eval_iters", "100000000", "10^8 validation micro-batches"),
        ("train.global_batch_size", "0", "a zero global batch"),
        ("parallel.step_timeout_minutes", "0", "a zero stall timeout"),
        ("model.max_position_embeddings", "0", "zero positions"), ("moe.router_bias_update_rate", "-1",
                                                                  "a negative expert-bias rate"),
        ("model.num_layers", "3", "3 layers under PP=2 (uneven stages)")]:
    extra = ["parallel.pipeline_model_parallel_size=2", "moe.num_experts=null",
             "parallel.expert_model_parallel_size=1"] if key == "model.num_layers" else []
    extra += ["moe.router_enable_expert_bias=true"] if key == "moe.router_bias_update_rate" else []
    steps = [] if key == "train.train_iters" else ["train.train_iters=2"]
    simple(f"{key}={value}", "new", "key", what, *steps, f"{key}={value}", *extra, resume=False, check=None,
           needs_checkpoint=False)

simple("save_empty_string", "new", "path", "checkpoint.save= (empty: the current directory)", "checkpoint.save=",
       "train.train_iters=2", resume=False, check=None, needs_checkpoint=False)
simple("log_dir_empty_string", "new", "path", "logging.log_dir= (empty)", "logging.log_dir=", "train.train_iters=2",
       resume=False, check=None, needs_checkpoint=False)
for key in ("data.data_cache_path", "checkpoint.save", "logging.log_dir"):
    case(f"{key}_unwritable", "new", "path", f"{key}=/proc/megamoe-x (a directory nobody can create)",
         needs_checkpoint=False)(lambda ctx, key=key: ctx.train(f"{key}=/proc/megamoe-x", "train.train_iters=2",
                                                               resume=False))


@case("data_cache_path_is_a_file", "new", "path", "data.data_cache_path=<a file>", needs_checkpoint=False)
def _(ctx):
    (ctx.case_dir / "afile").write_text("x")
    return ctx.train(f"data.data_cache_path={ctx.case_dir / 'afile'}", "train.train_iters=2", resume=False)


case("tokenizer_model_is_a_directory", "new", "path", "data.tokenizer_model=<a directory>", needs_checkpoint=False)(
    lambda ctx: ctx.train(f"data.tokenizer_model={ctx.case_dir}", resume=False))


@case("tokenizer_model_empty_file", "new", "path", "data.tokenizer_model=<an empty file>", needs_checkpoint=False)
def _(ctx):
    (ctx.case_dir / "empty.model").write_bytes(b"")
    return ctx.train(f"data.tokenizer_model={ctx.case_dir / 'empty.model'}", resume=False)


case("config_is_a_directory", "new", "path", "--config <a directory>", needs_checkpoint=False)(
    lambda ctx: ctx.train(resume=False, config=str(ctx.case_dir)))
case("override_section_as_value", "new", "key", "train=5", needs_checkpoint=False)(
    lambda ctx: ctx.train("train=5", resume=False))


@case("negative_ids_int8", "new", "data", "an int8 dataset holding negative ids", needs_checkpoint=False)
def _(ctx):
    prefix = dataset_with(ctx, [[-5, 7, 9, -100] * 50 for _ in range(40)], dtype="int8")
    return ctx.train(f"data.data_path=[{prefix}]", resume=False)


@case("sidecar_corrupt", "new", "data", "<prefix>.meta.json that is not JSON", needs_checkpoint=False)
def _(ctx):
    prefix = ctx.copy_dataset()
    Path(prefix + ".meta.json").write_text("{truncated")
    return ctx.train(f"data.data_path=[{prefix}]", resume=False)


@case("latest_outside_the_run", "new", "ckpt", "'latest' naming an absolute path outside the run (/tmp)")
def _(ctx):
    (ctx.ckpt / "latest").write_text("/tmp")
    return ctx.train()


@case("manifest_not_json", "new", "ckpt", "manifest.json that is not JSON")
def _(ctx):
    (ctx.ckpt / "iter_0000020" / "manifest.json").write_text("{")
    return ctx.train()


@case("config_yaml_missing_verify_none", "new", "ckpt", "the tag's config.yaml deleted, checkpoint.verify=none")
def _(ctx):
    (ctx.ckpt / "iter_0000020" / "config.yaml").unlink()
    return ctx.train("checkpoint.verify=none")


case("load_an_hf_directory", "new", "ckpt", "checkpoint.load=<a Hugging Face export>", check=steps_lost)(
    lambda ctx: ctx.train(f"checkpoint.load={ctx.fixtures / 'hf'}", f"checkpoint.save={ctx.case_dir / 'new'}",
                          "train.train_iters=4", resume=False))


@case("tags_without_latest", "new", "ckpt", "a run directory with iter_* tags but no 'latest' (load = save)",
      check=latest_check(None))
def _(ctx):
    (ctx.ckpt / "latest").unlink()
    return ctx.train("train.train_iters=4")


@case("resume_other_tokenizer", "new", "ckpt", "resume with a 400-piece tokenizer and its dataset")
def _(ctx):
    out = ctx.case_dir / "tok400"
    subprocess.run(ctx.tool("preprocess_data.py", "--input", ctx.fixtures / "corpus.jsonl", "--output-prefix", out,
                            "--train-tokenizer", "--vocab-size", "400"), cwd=ctx.repo, capture_output=True,
                   check=True)
    return ctx.train(f"data.data_path=[{out}_text_document]", f"data.tokenizer_model={out}.model")


simple("resume_more_experts", "new", "ckpt", "resume with moe.num_experts=8 (the checkpoint has 4)",
       "moe.num_experts=8")
simple("resume_other_variant", "new", "ckpt", "resume with moe.variant=mpo", "moe.variant=mpo")


@case("import_without_config_json", "new", "tool", "convert_checkpoint.py --load-hf <a directory without "
      "config.json>", needs_checkpoint=False)
def _(ctx):
    (ctx.case_dir / "hf").mkdir()
    shutil.copy(ctx.fixtures / "hf" / "tokenizer.model", ctx.case_dir / "hf")
    return ctx.tool("convert_checkpoint.py", "--load-hf", ctx.case_dir / "hf", "--save", ctx.case_dir / "out",
                    "--config", ctx.repo / "configs" / "tiny-moe.yaml")


case("import_a_megamoe_checkpoint", "new", "tool", "convert_checkpoint.py --load-hf <a megamoe checkpoint dir>")(
    lambda ctx: ctx.tool("convert_checkpoint.py", "--load-hf", ctx.ckpt, "--save", ctx.case_dir / "out",
                         "--config", ctx.repo / "configs" / "tiny-moe.yaml"))
case("export_unwritable", "new", "tool", "convert_checkpoint.py --load <run> --save /proc/megamoe-hf")(
    lambda ctx: ctx.tool("convert_checkpoint.py", "--load", ctx.ckpt, "--save", "/proc/megamoe-hf"))
case("evaluate_without_load", "new", "tool", "tools/evaluate.py without checkpoint.load", needs_checkpoint=False)(
    lambda ctx: ctx.train(resume=False, script="tools/evaluate.py"))


@case("inspect_corrupt_idx", "new", "tool", "tools/inspect_dataset.py on a truncated .idx", needs_checkpoint=False)
def _(ctx):
    prefix = ctx.copy_dataset()
    idx = Path(prefix + ".idx")
    idx.write_bytes(idx.read_bytes()[:40])
    return ctx.tool("inspect_dataset.py", prefix)


case("preprocess_input_is_a_directory", "new", "tool", "preprocess_data.py --input <a directory>",
     needs_checkpoint=False)(lambda ctx: ctx.tool("preprocess_data.py", "--input", ctx.case_dir, "--output-prefix",
                                                  ctx.case_dir / "out", "--tokenizer-model", ctx.tokenizer))


@case("preprocess_corrupt_gzip", "new", "tool", "preprocess_data.py --input <a truncated .jsonl.gz>",
      needs_checkpoint=False)
def _(ctx):
    corrupt = ctx.case_dir / "corpus.jsonl.gz"
    corrupt.write_bytes((ctx.repo / CORPUS).read_bytes()[:5000])
    return ctx.tool("preprocess_data.py", "--input", corrupt, "--output-prefix", ctx.case_dir / "out",
                    "--tokenizer-model", ctx.tokenizer)


@case("preprocess_text_not_a_string", "new", "tool", "preprocess_data.py on a JSON line whose text is a number",
      needs_checkpoint=False)
def _(ctx):
    corpus = ctx.case_dir / "numbers.jsonl"
    corpus.write_text('{"text": "a fine line"}\n{"text": 12345}\n{"text": null}\n')
    return ctx.tool("preprocess_data.py", "--input", corpus, "--output-prefix", ctx.case_dir / "out",
                    "--tokenizer-model", ctx.tokenizer)


@case("preprocess_output_parent_is_a_file", "new", "tool", "preprocess_data.py --output-prefix <file>/out",
      needs_checkpoint=False)
def _(ctx):
    (ctx.case_dir / "afile").write_text("x")
    return ctx.tool("preprocess_data.py", "--input", ctx.fixtures / "corpus.jsonl", "--output-prefix",
                    ctx.case_dir / "afile" / "out", "--tokenizer-model", ctx.tokenizer)


case("preprocess_vocab_zero", "new", "tool", "preprocess_data.py --train-tokenizer --vocab-size 0",
     needs_checkpoint=False)(lambda ctx: ctx.tool(
         "preprocess_data.py", "--input", ctx.fixtures / "corpus.jsonl", "--output-prefix", ctx.case_dir / "out",
         "--train-tokenizer", "--vocab-size", "0"))
case("plan_zero_nodes", "new", "tool", "tools/plan.py --nodes 0", needs_checkpoint=False)(
    lambda ctx: ctx.tool("plan.py", "--config", ctx.repo / "configs" / "tiny-moe.yaml", "--nodes", "0"))


def signal_launcher(signum: int) -> Callable[[Ctx, subprocess.Popen], None]:
    def drive(ctx: Ctx, proc: subprocess.Popen) -> None:
        if wait_for_step(ctx, 21):
            launcher = [p for p in processes_under(ctx.case_dir)
                        if b"deepspeed.launcher.launch" in Path(f"/proc/{p}/cmdline").read_bytes()]
            for pid in launcher:
                os.kill(pid, signum)
    return drive


case("sigterm_to_node_launcher", "new", "signal", "SIGTERM to deepspeed.launcher.launch (the per-node launcher)",
     drive=signal_launcher(signal.SIGTERM), check=stop_check)(lambda ctx: ctx.train(*LONG_RUN))
case("sigkill_to_runner", "new", "signal", "SIGKILL to the `deepspeed` command", drive=signal_runner(signal.SIGKILL),
     check=stop_check)(lambda ctx: ctx.train(*LONG_RUN))
case("sighup_to_runner", "new", "signal", "SIGHUP to the `deepspeed` command (its terminal closed)",
     drive=signal_runner(signal.SIGHUP), check=stop_check)(lambda ctx: ctx.train(*LONG_RUN))
case("ctrl_c_twice", "new", "signal", "SIGINT twice to the process group (Ctrl-C, Ctrl-C)",
     drive=signal_group(signal.SIGINT, times=2), check=stop_check)(lambda ctx: ctx.train(*LONG_RUN))


def second_run(ctx: Ctx, proc: subprocess.Popen) -> None:
    if wait_for_step(ctx, 21):
        second = ctx.train("train.train_iters=30", "checkpoint.save_interval=2", "train.lr=1e-2",
                           f"logging.log_dir={ctx.case_dir}/l2")
        out = subprocess.run(second, cwd=ctx.repo, capture_output=True, text=True, timeout=TIMEOUT_S)
        ctx.notes.append(f"second run (another lr): rc {out.returncode}, says {summarise(out.stdout + out.stderr)[0]!r}"
                         + ("; LOST (its checkpoints interleave with the first run's)" if out.returncode == 0 else ""))


def second_run_then_stop(ctx: Ctx, proc: subprocess.Popen) -> None:
    second_run(ctx, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the first run (still training) stops with a checkpoint


case("two_runs_one_directory", "new", "fs", "a second run (another lr) started into the same checkpoint directory "
     "while the first trains", drive=second_run_then_stop, check=stop_check)(
    lambda ctx: ctx.train("train.train_iters=100000", "checkpoint.save_interval=2"))


def remove_log_dir(ctx: Ctx, proc: subprocess.Popen) -> None:
    if wait_for_step(ctx, 21):
        shutil.rmtree(ctx.case_dir / "logs", ignore_errors=True)


case("log_dir_removed_mid_run", "new", "fs", "logging.log_dir removed while training", drive=remove_log_dir,
     check=end_check)(lambda ctx: ctx.train("train.train_iters=40"))


@case("partial_leftover_then_resume", "new", "fs", "a killed save's .partial leftover, then resume",
      expect_success=True, check=latest_check("iter_0000022"))
def _(ctx):
    (ctx.ckpt / ".partial" / "iter_0000021").mkdir(parents=True)
    (ctx.ckpt / ".partial" / "iter_0000021" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    return ctx.train()

