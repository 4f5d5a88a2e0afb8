"""The cases the hostile-inputs issue lists: work lost or hangs, and tracebacks or misleading messages."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.probe.harness import (
    LONG_RUN,
    TIMEOUT_S,
    VOCAB,
    Ctx,
    case,
    dataset_with,
    files_state,
    latest_check,
    signal_group,
    signal_runner,
    simple,
    steps_lost,
    stop_check,
    wait_for_step,
    write_dataset,
)


# -- must fix (issue) --
@case("split_without_documents", "issue", "must", "data.split=100,0.0001,0: the validation split gets no document")
def _(ctx):
    return ctx.train("data.split=100,0.0001,0", resume=False)


@case("one_document_default_split", "issue", "must", "a one-document dataset with the default split 969,30,1",
      needs_checkpoint=False)
def _(ctx):
    prefix = dataset_with(ctx, [list(range(4, 300))])
    return ctx.train(f"data.data_path=[{prefix}]", "data.split=969,30,1", resume=False)


@case("ids_in_padding_rows", "issue", "must", f"a .bin whose ids are all {VOCAB + 5} with a {VOCAB}-piece tokenizer "
      "(inside megatron's padded rows)", needs_checkpoint=False)
def _(ctx):
    prefix = dataset_with(ctx, [[VOCAB + 5] * 200 for _ in range(40)])
    return ctx.train(f"data.data_path=[{prefix}]", resume=False)


@case("save_parent_is_a_file", "issue", "must", "checkpoint.save=<file>/ckpt: fails only at the first save",
      check=steps_lost, needs_checkpoint=False)
def _(ctx):
    (ctx.case_dir / "afile").write_text("x")
    return ctx.train(f"checkpoint.save={ctx.case_dir / 'afile' / 'ckpt'}", "train.train_iters=4", resume=False)


@case("load_typo", "issue", "must", "checkpoint.load=<a path that does not exist>, saving elsewhere",
      check=steps_lost)
def _(ctx):
    return ctx.train(f"checkpoint.load={ctx.case_dir / 'ckpt_typo'}", f"checkpoint.save={ctx.case_dir / 'new'}",
                     "train.train_iters=4", resume=False)


@case("load_tag_directory", "issue", "must", "checkpoint.load=<run>/iter_0000020 (a tag, not the run directory)",
      check=steps_lost)
def _(ctx):
    return ctx.train(f"checkpoint.load={ctx.ckpt / 'iter_0000020'}", f"checkpoint.save={ctx.case_dir / 'new'}",
                     "train.train_iters=4", resume=False)


def schedule_check(ctx: Ctx, result: dict) -> str:
    metrics = ctx.case_dir / "logs" / "metrics.jsonl"
    lrs = {r["step"]: r.get("train/lr") for r in map(json.loads, metrics.read_text().splitlines())
           if "train/lr" in r} if metrics.is_file() else {}
    saved = ctx.ckpt / "iter_0000024" / "config.yaml"
    recorded = re.findall(r"(train_iters|lr): (\S+)", saved.read_text()) if saved.is_file() else []
    # The checkpoint's schedule (decay over 20 steps) is at min_lr 3e-4 after step 20; the new one is not.
    ignored = lrs.get(21) is not None and abs(lrs[21] - 3e-4) < 1e-9
    return (f"lr used at steps 21-24: {[lrs.get(s) for s in range(21, 25)]}; config.yaml records {recorded}"
            + ("; IGNORED (the checkpoint's schedule was used)" if ignored else ""))


@case("resume_changed_schedule", "issue", "must", "resume with train.train_iters=24 train.lr=1e-2 train.min_lr=1e-3",
      check=schedule_check, expect_success=True)
def _(ctx):
    return ctx.train("train.train_iters=24", "train.lr=1e-2", "train.min_lr=1e-3")


simple("new_run_into_other_runs_directory", "issue", "must",
       "a new run (another model, no checkpoint.load) saving into a run's checkpoint directory",
       "model.hidden_size=32", "train.train_iters=10", resume=False)


@case("import_into_existing_run", "issue", "must", "convert_checkpoint.py --load-hf <hf> --save <a run's checkpoints>",
      check=latest_check("iter_0000020"))
def _(ctx):
    return ctx.tool("convert_checkpoint.py", "--load-hf", ctx.fixtures / "hf", "--save", ctx.ckpt, "--config",
                    ctx.repo / "configs" / "tiny-moe.yaml", f"data.data_path=[{ctx.prefix}]")


@case("upcycle_into_existing_run", "issue", "must", "upcycle.py --load <dense run> --save <a run's checkpoints>",
      check=latest_check("iter_0000020"))
def _(ctx):
    return ctx.tool("upcycle.py", "--load", ctx.fixtures / "dense" / "ckpt", "--save", ctx.ckpt,
                    "moe.num_experts=4")


def dataset_kept(ctx: Ctx, result: dict) -> str:
    now = files_state([Path(ctx.note_prefix + s) for s in (".bin", ".idx")])
    left = sorted(p.name for p in Path(ctx.note_prefix).parent.iterdir())
    return f"dataset files {'unchanged' if now == ctx.note_state else 'CHANGED (LOST)'}; directory holds {left}"


@case("failed_preprocessing_over_a_dataset", "issue", "must", "preprocess_data.py with a bad line 201 and the "
      "--output-prefix of an existing dataset", check=dataset_kept, needs_checkpoint=False)
def _(ctx):
    prefix = ctx.copy_dataset()
    ctx.note_prefix = prefix
    ctx.note_state = files_state([Path(prefix + s) for s in (".bin", ".idx")])
    corpus = ctx.case_dir / "bad.jsonl"
    lines = (ctx.fixtures / "corpus.jsonl").read_text().splitlines()
    corpus.write_text("\n".join(lines[:200] + ["{not json"] + lines[200:]) + "\n")
    return ctx.tool("preprocess_data.py", "--input", corpus, "--output-prefix", prefix.removesuffix("_text_document"),
                    "--tokenizer-model", ctx.tokenizer)


case("sigterm_to_runner", "issue", "must", "SIGTERM to the `deepspeed` command while training",
     drive=signal_runner(signal.SIGTERM), check=stop_check)(lambda ctx: ctx.train(*LONG_RUN))
case("sigint_to_runner", "issue", "must", "SIGINT to the `deepspeed` command while training",
     drive=signal_runner(signal.SIGINT), check=stop_check)(lambda ctx: ctx.train(*LONG_RUN))

# -- one line instead of a traceback (issue) --
for key, value in [("model.ffn_hidden_size", "0"), ("model.ffn_hidden_size", "-5"), ("model.num_query_groups", "0"),
                   ("model.kv_channels", "0"), ("model.make_vocab_size_divisible_by", "0"),
                   ("model.init_method_std", "-0.02"), ("model.rotary_base", "0"), ("model.norm_epsilon", "0"),
                   ("train.seed", "-1"), ("train.seed", "4294967296"), ("train.adam_beta1", "1.5"),
                   ("train.adam_beta2", "1.0"), ("train.weight_decay", "-0.1")]:
    simple(f"{key}={value}", "issue", "line", f"{key}={value}", f"{key}={value}", resume=False,
           check=None, needs_checkpoint=False)

case("nan_blend_weight", "issue", "line", "data.data_path=[nan, P, 1, P]", needs_checkpoint=False)(
    lambda ctx: ctx.train(f"data.data_path=[nan, {ctx.prefix}, 1, {ctx.prefix}]", resume=False))
simple("seq_not_divisible_by_tp", "issue", "line", "seq_length 63 under TP=2 with sequence parallelism",
       "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "data.seq_length=63",
       resume=False, check=None, needs_checkpoint=False)
simple("distributed_timeout_too_small", "issue", "line", "parallel.distributed_timeout_minutes=0.00001",
       "parallel.distributed_timeout_minutes=0.00001", resume=False, check=None, needs_checkpoint=False)
simple("seq_length_beyond_memory", "issue", "line", "data.seq_length=1000000", "data.seq_length=1000000",
       resume=False, check=None, needs_checkpoint=False)
simple("seq_length_beyond_data", "issue", "line", "data.seq_length=200000 (the corpus holds ~60k tokens)",
       "data.seq_length=200000", "model.max_position_embeddings=200000", resume=False, check=None,
       needs_checkpoint=False)


@case("log_dir_is_a_file", "issue", "line", "logging.log_dir=<a file>", needs_checkpoint=False)
def _(ctx):
    (ctx.case_dir / "afile").write_text("x")
    return ctx.train(f"logging.log_dir={ctx.case_dir / 'afile'}", resume=False)


simple("deepspeed_extra_wrong_value", "issue", "line", "deepspeed.extra={zero_optimization: {reduce_bucket_size: big}}",
       "deepspeed.extra={zero_optimization: {reduce_bucket_size: big}}", resume=False, check=None,
       needs_checkpoint=False)
def warned(pattern: str) -> Callable[[Ctx, dict], str]:
    def check(ctx: Ctx, result: dict) -> str:
        text = (ctx.case_dir / "output.txt").read_text(errors="replace")
        found = re.search(pattern, text)
        return f"warns: {found[0]!r}" if found else "NOT WARNED (LOST: silently ignored)"
    return check


simple("deepspeed_extra_unknown_key", "issue", "line", "deepspeed.extra={zero_optimisation: {overlap_comm: true}} "
       "(trains, and must say the key is not DeepSpeed's)", "deepspeed.extra={zero_optimisation: {overlap_comm: true}}",
       "train.train_iters=2", resume=False, needs_checkpoint=False, expect_success=True,
       check=warned(r"deepspeed.extra.zero_optimisation is not a DeepSpeed [^;\n]*"))


@case("tokenizer_model_not_a_model", "issue", "line", "data.tokenizer_model=<a text file>", needs_checkpoint=False)
def _(ctx):
    (ctx.case_dir / "tok.model").write_text("not a model\n")
    return ctx.train(f"data.tokenizer_model={ctx.case_dir / 'tok.model'}", resume=False)


@case("config_is_binary", "issue", "line", "--config <a binary file>", needs_checkpoint=False)
def _(ctx):
    return ctx.train(resume=False, config=str(Path(ctx.prefix + ".bin")))


@case("empty_bin_valid_idx", "issue", "data", "an empty .bin beside a valid .idx", needs_checkpoint=False)
def _(ctx):
    prefix = ctx.copy_dataset()
    Path(prefix + ".bin").write_bytes(b"")
    return ctx.train(f"data.data_path=[{prefix}]", resume=False)


@case("ids_beyond_padded_vocab", "issue", "data", f"ids {VOCAB + 100} (beyond the padded vocabulary of 512)",
      needs_checkpoint=False)
def _(ctx):
    prefix = dataset_with(ctx, [[VOCAB + 100] * 200 for _ in range(40)])
    return ctx.train(f"data.data_path=[{prefix}]", resume=False)


@case("idx_document_boundaries_wrong", "issue", "data", ".idx document boundaries that disagree with the sequence "
      "count", needs_checkpoint=False)
def _(ctx):
    prefix = ctx.copy_dataset()
    idx = Path(prefix + ".idx")
    raw = bytearray(idx.read_bytes())
    raw[-8:] = (int.from_bytes(raw[-8:], "little") + 7).to_bytes(8, "little")  # last boundary past the end
    idx.write_bytes(bytes(raw))
    return ctx.train(f"data.data_path=[{prefix}]", resume=False)


@case("stale_index_cache", "issue", "data", "a dataset replaced under the same prefix after a run built megatron's "
      "index cache (the new one must train)", needs_checkpoint=False, expect_success=True)
def _(ctx):
    prefix = ctx.copy_dataset()
    cmd = ctx.train(f"data.data_path=[{prefix}]", "train.train_iters=2", f"checkpoint.save={ctx.case_dir / 'c1'}",
                    resume=False)
    subprocess.run(cmd, cwd=ctx.repo, capture_output=True, timeout=TIMEOUT_S)
    write_dataset(prefix, [list(range(4, 100)) for _ in range(12)])
    Path(prefix + ".meta.json").unlink(missing_ok=True)
    return ctx.train(f"data.data_path=[{prefix}]", "train.train_iters=2", resume=False)


def truncate_bin(ctx: Ctx, proc: subprocess.Popen) -> None:
    if wait_for_step(ctx, 2):
        path = Path(ctx.note_prefix + ".bin")
        os.truncate(path, path.stat().st_size // 10)


@case("bin_truncated_mid_run", "issue", "data", "the .bin truncated to a tenth while training", drive=truncate_bin,
      needs_checkpoint=False, check=lambda ctx, result: "")
def _(ctx):
    ctx.note_prefix = ctx.copy_dataset()
    return ctx.train(f"data.data_path=[{ctx.note_prefix}]", "train.train_iters=100000", "data.num_workers=1",
                     resume=False)


@case("latest_garbage", "issue", "ckpt", "'latest' holding binary garbage")
def _(ctx):
    (ctx.ckpt / "latest").write_bytes(b"\xff\xfe\x00garbage")
    return ctx.train()


@case("latest_empty", "issue", "ckpt", "'latest' empty")
def _(ctx):
    (ctx.ckpt / "latest").write_text("")
    return ctx.train()


simple("resume_other_model_shape", "issue", "ckpt", "resume with model.ffn_hidden_size=96 (the checkpoint has 128)",
       "model.ffn_hidden_size=96", "moe.ffn_hidden_size=48")


@case("evaluate_other_model_shape", "issue", "ckpt", "tools/evaluate.py with model.hidden_size=96")
def _(ctx):
    return ctx.train("model.hidden_size=96", script="tools/evaluate.py")


@case("missing_expert_shard_verify_none", "issue", "ckpt", "experts_ep001.pt deleted, checkpoint.verify=none")
def _(ctx):
    (ctx.ckpt / "iter_0000020" / "experts_ep001.pt").unlink()
    return ctx.train("checkpoint.verify=none")


def poison_model_file(tag: Path) -> None:
    """Fill the first floating tensor of the model file with NaN, keeping the file's size (and manifest sizes)."""
    code = ("import sys, torch\np = sys.argv[1]\ns = torch.load(p, weights_only=False)\n"
            "t = next(v for v in s['module'].values() if torch.is_tensor(v) and v.is_floating_point())\n"
            "t.fill_(float('nan'))\ntorch.save(s, p)\n")
    subprocess.run([sys.executable, "-c", code, str(tag / "mp_rank_00_model_states.pt")], check=True)


@case("nan_weights_verify_sizes", "issue", "ckpt", "NaN weights in the model file, checkpoint.verify=sizes")
def _(ctx):
    tag = ctx.ckpt / "iter_0000020"
    size = (tag / "mp_rank_00_model_states.pt").stat().st_size
    poison_model_file(tag)
    ctx.notes.append(f"model file size kept: {(tag / 'mp_rank_00_model_states.pt').stat().st_size == size}")
    return ctx.train("checkpoint.verify=sizes")


def full_disk_check(ctx: Ctx, result: dict) -> str:
    mount = ctx.case_dir / "small"
    left = sorted(str(p.relative_to(mount)) for p in mount.rglob("*")) if mount.is_dir() else []
    free = shutil.disk_usage(mount).free if mount.is_dir() else 0
    subprocess.run(["umount", str(mount)], capture_output=True)
    return f"left on the small file system: {left[:6]}{'...' if len(left) > 6 else ''}; {free} bytes free"


@case("full_disk_during_save", "issue", "ckpt", "checkpoint.save on a 3 MB file system (a full disk at the save)",
      check=full_disk_check, needs_checkpoint=False)
def _(ctx):
    mount = ctx.case_dir / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], check=True)
    return ctx.train(f"checkpoint.save={mount / 'ckpt'}", "train.train_iters=3", resume=False)


case("ctrl_c_to_process_group", "issue", "signal", "SIGINT to the launch's process group (Ctrl-C)",
     drive=signal_group(signal.SIGINT), check=stop_check)(lambda ctx: ctx.train(*LONG_RUN))


@case("preprocess_binary_file", "issue", "tool", "preprocess_data.py --input <a binary file as .txt>",
      needs_checkpoint=False)
def _(ctx):
    binary = ctx.case_dir / "binary.txt"
    shutil.copy(sys.executable, binary)
    return ctx.tool("preprocess_data.py", "--input", binary, "--output-prefix", ctx.case_dir / "out",
                    "--tokenizer-model", ctx.tokenizer)


case("preprocess_vocab_too_large", "issue", "tool", "preprocess_data.py --train-tokenizer --vocab-size 100000 on "
     "300 documents", needs_checkpoint=False)(lambda ctx: ctx.tool(
         "preprocess_data.py", "--input", ctx.fixtures / "corpus.jsonl", "--output-prefix", ctx.case_dir / "out",
         "--train-tokenizer", "--vocab-size", "100000"))
case("preprocess_missing_tokenizer", "issue", "tool", "preprocess_data.py --tokenizer-model <missing>",
     needs_checkpoint=False)(lambda ctx: ctx.tool(
         "preprocess_data.py", "--input", ctx.fixtures / "corpus.jsonl", "--output-prefix", ctx.case_dir / "out",
         "--tokenizer-model", ctx.case_dir / "missing.model"))


@case("export_save_is_a_file", "issue", "tool", "convert_checkpoint.py --load <run> --save <an existing file>")
def _(ctx):
    (ctx.case_dir / "afile").write_text("x")
    return ctx.tool("convert_checkpoint.py", "--load", ctx.ckpt, "--save", ctx.case_dir / "afile")


