"""The hostile-input probe: careless or unlucky inputs through the command line only, each in its own directory.

    python tests/hostile_probe.py --out runs/probe [--repo <checkout>] [--cases a,b,...] [--list]

Every case runs a real command (the deepspeed launcher with 2 processes, or a tool) against its own copy of a
20-step tiny-MoE checkpoint (EP=2, ZeRO-2) and dataset, and records the exit code, the first line the user is
told (a megamoe one-line error, else the last line of a traceback, else the last line printed), whether it
hung, which processes it left running, and what it lost or left behind (a `check` per case). `--repo` runs
the same cases against another checkout (e.g. a `git worktree` of an older commit) for a before/after table.
Writes `<out>/results.json` and `<out>/table.md`. Not part of the test suite: a full probe takes ~an hour on
2 cores. The regression tests of each fixed case live in tests/unit and tests/integration.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CORPUS = Path("data") / "shakespeare-train.jsonl.gz"  # under the probed checkout
VOCAB = 500  # megatron pads the embedding to 512: ids 500-511 are padding rows, 512+ are outside it
TIMEOUT_S = 150
SETTLE_S = 45  # after a signal: how long every process of the launch gets to end


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Ctx:
    repo: Path
    python: str
    fixtures: Path
    case_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return str(self.fixtures / "corpus_text_document")

    @property
    def tokenizer(self) -> str:
        return str(self.fixtures / "corpus.model")

    @property
    def ckpt(self) -> Path:
        return self.case_dir / "ckpt"

    def tool(self, name: str, *args: str) -> list[str]:
        return [self.python, str(self.repo / "tools" / name), *map(str, args)]

    def train(self, *overrides: str, resume: bool = True, config: str = "configs/tiny-moe.yaml",
              script: str = "launchers/pretrain.py") -> list[str]:
        """deepspeed --num_gpus 2 <script> of the tiny MoE on the fixture data, saving (and by default resuming)
        in this case's copy of the 20-step checkpoint; `overrides` win."""
        base = [f"data.data_path=[{self.prefix}]", f"data.tokenizer_model={self.tokenizer}", *TINY,
                f"logging.log_dir={self.case_dir / 'logs'}", f"checkpoint.save={self.ckpt}"]
        if resume:
            base.append(f"checkpoint.load={self.ckpt}")
        return [str(Path(self.python).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                str(self.repo / script), "--config", str(self.repo / config), *base, *overrides]

    def latest(self, directory: Path | None = None) -> str | None:
        path = (directory or self.ckpt) / "latest"
        try:
            return path.read_text().strip() if path.is_file() else None
        except UnicodeDecodeError:
            return "<binary>"

    def copy_checkpoint(self) -> None:
        shutil.copytree(self.fixtures / "ckpt", self.ckpt)

    def copy_dataset(self, name: str = "data") -> str:
        """A private copy of the fixture dataset (bin, idx, sidecar); returns its prefix."""
        out = self.case_dir / name
        out.mkdir(parents=True, exist_ok=True)
        for path in self.fixtures.glob("corpus_text_document*"):
            shutil.copy(path, out / path.name)
        return str(out / "corpus_text_document")


TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "moe.num_experts=4", "moe.ffn_hidden_size=64", "data.seq_length=64",
        "data.split=90,10,0", "train.micro_batch_size=4", "train.global_batch_size=8", "train.train_iters=22",
        "train.lr_warmup_iters=1", "train.eval_interval=100", "train.eval_iters=2", "train.log_interval=1",
        "checkpoint.save_interval=1000", "parallel.step_timeout_minutes=3", "logging.wandb=false",
        "logging.tensorboard=false"]


@dataclass
class Case:
    name: str
    source: str  # "issue" (listed in the issue) or "new" (this probe's own)
    group: str
    what: str
    setup: Callable[[Ctx], list[str]]
    check: Callable[[Ctx, dict], str] | None = None
    drive: Callable[[Ctx, subprocess.Popen], None] | None = None
    """For signal and mid-run fault cases: acts on the running launch."""
    expect_success: bool = False
    needs_checkpoint: bool = True


# ---- fixture ----------------------------------------------------------------------------------------------------

def run_quiet(cmd: list[str], cwd: Path, timeout: float = 600) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"fixture step failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def build_fixtures(repo: Path, python: str, root: Path) -> Path:
    """Dataset (300 documents, a 500-piece tokenizer), a 20-step tiny-MoE checkpoint (saved at 10 and 20), its
    Mixtral export, and a 2-step dense checkpoint."""
    fixtures = root / "fixtures"
    if (fixtures / "done").is_file():
        return fixtures
    shutil.rmtree(fixtures, ignore_errors=True)
    fixtures.mkdir(parents=True)
    with gzip.open(repo / CORPUS, "rt") as src, (fixtures / "corpus.jsonl").open("w") as dst:
        dst.writelines(itertools.islice(src, 300))
    ctx = Ctx(repo=repo, python=python, fixtures=fixtures, case_dir=fixtures)
    run_quiet(ctx.tool("preprocess_data.py", "--input", fixtures / "corpus.jsonl", "--output-prefix",
                       fixtures / "corpus", "--train-tokenizer", "--vocab-size", VOCAB), repo)
    run_quiet(ctx.train("train.train_iters=20", "checkpoint.save_interval=10", resume=False), repo)
    run_quiet(ctx.tool("convert_checkpoint.py", "--load", fixtures / "ckpt", "--save", fixtures / "hf"), repo)
    dense = Ctx(repo=repo, python=python, fixtures=fixtures, case_dir=fixtures / "dense")
    run_quiet(dense.train("train.train_iters=2", "moe.num_experts=null", "parallel.expert_model_parallel_size=1",
                          resume=False), repo)
    (fixtures / "done").write_text("ok\n")
    return fixtures


# ---- helpers used by cases ----------------------------------------------------------------------------------------

def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def write_dataset(prefix: str, docs: list[list[int]], dtype: str = "uint16", fix_sizes: bool = True) -> None:
    """A Megatron indexed dataset of `docs` written with megatron-core's own builder."""
    code = (f"import numpy, torch\n"
            f"from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder\n"
            f"b = IndexedDatasetBuilder({prefix + '.bin'!r}, dtype=numpy.{dtype})\n"
            f"for d in {docs!r}:\n    b.add_document(torch.tensor(d), [len(d)])\n"
            f"b.finalize({prefix + '.idx'!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def dataset_with(ctx: Ctx, ids: list[list[int]], dtype: str = "uint16") -> str:
    prefix = str(ctx.case_dir / "data" / "custom_text_document")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    write_dataset(prefix, ids, dtype)
    return prefix


def files_state(paths: list[Path]) -> dict[str, str | None]:
    return {p.name: sha(p) for p in paths}


def processes_under(directory: Path) -> list[int]:
    """PIDs of processes whose command line names `directory` (what a launch of this case started)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(directory) in args:
            pids.append(int(pid))
    return pids


def wait_for_step(ctx: Ctx, step: int, timeout: float = TIMEOUT_S) -> bool:
    metrics = ctx.case_dir / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if max(steps, default=0) >= step:
                return True
        time.sleep(0.2)
    return False


def latest_check(before: str) -> Callable[[Ctx, dict], str]:
    def check(ctx: Ctx, result: dict) -> str:
        now = ctx.latest()
        tags = sorted(p.name for p in ctx.ckpt.glob("iter_*"))
        lost = now != before or "iter_0000020" not in tags
        return f"latest {before} -> {now}; tags {tags}" + ("; LOST" if lost else "")
    return check


def steps_lost(ctx: Ctx, result: dict) -> str:
    metrics = ctx.case_dir / "logs" / "metrics.jsonl"
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    trained = [s for s in steps if s]
    saved = sorted(p.name for p in ctx.ckpt.glob("iter_*")) if ctx.ckpt.is_dir() else []
    lost = result["rc"] != 0 and bool(trained)
    return f"trained steps {min(trained, default=0)}..{max(trained, default=0)}, saved {saved}" + (
        "; LOST (steps trained, then the run failed)" if lost else "")


# ---- the cases ---------------------------------------------------------------------------------------------------

CASES: list[Case] = []


def case(name: str, source: str, group: str, what: str, **kwargs):
    def register(setup: Callable[[Ctx], list[str]]):
        CASES.append(Case(name=name, source=source, group=group, what=what, setup=setup, **kwargs))
        return setup
    return register


def simple(name: str, source: str, group: str, what: str, *overrides: str, resume: bool = True, **kwargs) -> None:
    """A training launch with `overrides`, which must fail in one line before any step (and lose nothing)."""
    case(name, source, group, what, check=kwargs.pop("check", latest_check("iter_0000020")), **kwargs)(
        lambda ctx: ctx.train(*overrides, resume=resume))


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


def signal_runner(signum: int, step: int = 21) -> Callable[[Ctx, subprocess.Popen], None]:
    def drive(ctx: Ctx, proc: subprocess.Popen) -> None:
        if wait_for_step(ctx, step):
            os.kill(proc.pid, signum)
    return drive


def signal_group(signum: int, times: int = 1) -> Callable[[Ctx, subprocess.Popen], None]:
    def drive(ctx: Ctx, proc: subprocess.Popen) -> None:
        if wait_for_step(ctx, 21):
            for _ in range(times):
                os.killpg(proc.pid, signum)
                time.sleep(1.0)
    return drive


def stop_check(ctx: Ctx, result: dict) -> str:
    """Every process ended, after a stop checkpoint (a tag beyond the fixture's iter_0000020)."""
    tags = sorted(p.name for p in ctx.ckpt.glob("iter_*"))
    return (f"processes left {result['left_running']}; latest {ctx.latest()}; tags {tags}"
            + ("; ORPHANS" if result["left_running"] else "")
            + ("; NO STOP CHECKPOINT (LOST: the steps since iter_0000020)" if tags[-1:] == ["iter_0000020"] else ""))


def end_check(ctx: Ctx, result: dict) -> str:
    tags = sorted(p.name for p in ctx.ckpt.glob("iter_*"))
    return f"processes left {result['left_running']}; latest {ctx.latest()}; tags {tags}" + (
        "; ORPHANS" if result["left_running"] else "")


LONG_RUN = ("train.train_iters=100000", "data.num_workers=1")
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


# ---- running ----------------------------------------------------------------------------------------------------

NOISE = re.compile(r"^\[(\d{4}-\d\d-\d\d |\d\d:\d\d:\d\d)|^\s*$|^W\d{4}|^\[rank\d+\]:\[W")


def summarise(output: str) -> tuple[str, bool]:
    """(what the user is told, whether a traceback was printed)."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in output.splitlines()]
    traceback = any(line.startswith("Traceback (most recent call last)") and "bin/deepspeed" not in "".join(
        lines[i + 1:i + 3]) for i, line in enumerate(lines))  # the runner's own KeyboardInterrupt is DeepSpeed's
    for line in lines:
        if re.match(r"^(megamoe: |preprocess_data: |usage: |\S+\.py: error: )", line) or \
                re.search(r"\bmegamoe: (config error|rank \d+|convert_checkpoint|upcycle|evaluate)", line):
            if line.startswith("usage: "):
                continue
            return line.strip()[:300], traceback
    if traceback:
        exc = [line for line in lines if re.match(r"^[A-Za-z_.]+(Error|Exception|Interrupt)\b", line)]
        return ("TRACEBACK: " + (exc[0] if exc else "?"))[:300], True
    meaningful = [line for line in lines if not NOISE.search(line)]
    return (meaningful[-1] if meaningful else (lines[-1] if lines else "")).strip()[:300], traceback


def default_sigint() -> None:
    """Ctrl-C's and a closed terminal's default actions in the launched command, as from a terminal (a probe started
    in the background by a shell, or under nohup, inherits SIGINT or SIGHUP ignored, as would all it starts)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def run_case(item: Case, repo: Path, python: str, fixtures: Path, out: Path) -> dict:
    case_dir = out / "cases" / item.name.replace("/", "_")
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    ctx = Ctx(repo=repo, python=python, fixtures=fixtures, case_dir=case_dir)
    if item.needs_checkpoint:
        ctx.copy_checkpoint()
    cmd = item.setup(ctx)
    start = time.monotonic()
    log = case_dir / "output.txt"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=default_sigint)
        if item.drive is not None:
            item.drive(ctx, proc)
        try:
            proc.wait(timeout=max(5.0, TIMEOUT_S - (time.monotonic() - start)) if item.drive is None else SETTLE_S)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
    deadline = time.monotonic() + (SETTLE_S if item.drive else 0.0)
    while item.drive and processes_under(case_dir) and time.monotonic() < deadline:  # the ranks may outlive `proc`
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    left = processes_under(case_dir)
    result = {"name": item.name, "source": item.source, "group": item.group, "what": item.what,
              "command": " ".join(map(str, cmd)).replace(str(repo) + "/", "").replace(str(out) + "/", ""),
              "rc": proc.returncode, "hung": timed_out, "seconds": round(elapsed, 1), "left_running": len(left)}
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    said, traceback = summarise(log.read_text(errors="replace"))
    result.update(said=said, traceback=traceback)
    result["outcome"] = item.check(ctx, result) if item.check else ""
    result["notes"] = "; ".join(ctx.notes)
    result["verdict"] = verdict(item, result)
    return result


def verdict(item: Case, r: dict) -> str:
    if r["hung"] or r["left_running"]:
        return "BAD"
    if any(word in r["outcome"] + r["notes"] for word in ("LOST", "ORPHANS", "IGNORED")):
        return "BAD"
    if item.expect_success:
        return "ok" if r["rc"] == 0 else "BAD"
    if item.drive is not None:  # a signal or a fault while training: everything ended, and no rank's traceback
        return "TRACEBACK" if r["traceback"] else "ok"
    if r["rc"] == 0:
        return "BAD"
    return "TRACEBACK" if r["traceback"] or not r["said"].startswith(("megamoe", "preprocess_data")) and \
        ": error:" not in r["said"] else "ok"


def write_table(results: list[dict], out: Path) -> None:
    rows = ["| case | source | command (abridged) | rc | first line it prints | outcome | verdict |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        said = r["said"].replace("|", "\\|")
        command = r["command"][-160:].replace("|", "\\|")
        outcome = (r["outcome"] + (f"; {r['notes']}" if r["notes"] else "")).replace("|", "\\|")
        rc = "hung" if r["hung"] else r["rc"]
        rows.append(f"| {r['name']} | {r['source']} | `{command}` | {rc} | {said} | {outcome} | {r['verdict']} |")
    (out / "table.md").write_text("\n".join(rows) + "\n")


def rewrite_table(out: Path) -> int:
    """The table again from the stored results, each case's output summarised anew (its verdict too)."""
    cases = {c.name: c for c in CASES}
    results = json.loads((out / "results.json").read_text())
    for r in results:
        log = out / "cases" / r["name"].replace("/", "_") / "output.txt"
        if log.is_file() and r["name"] in cases:
            r["said"], r["traceback"] = summarise(log.read_text(errors="replace"))
            r["verdict"] = verdict(cases[r["name"]], r)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, out)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/probe"))
    parser.add_argument("--repo", type=Path, default=HERE, help="the checkout to probe (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="its environment's python")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from results.json and each "
                        "case's output.txt")
    args = parser.parse_args()
    if args.list:
        for item in CASES:
            print(f"{item.name:40s} {item.source:6s} {item.group:7s} {item.what}")
        return 0
    wanted = set(args.cases.split(",")) if args.cases else None
    if wanted and (unknown := wanted - {c.name for c in CASES}):
        parser.error(f"unknown cases {sorted(unknown)}")
    out, repo = args.out.resolve(), args.repo.resolve()
    if args.table:
        return rewrite_table(out)
    out.mkdir(parents=True, exist_ok=True)
    fixtures = build_fixtures(repo, args.python, out)
    results_file = out / "results.json"
    results = {r["name"]: r for r in json.loads(results_file.read_text())} if results_file.is_file() else {}
    for item in CASES:
        if wanted is not None and item.name not in wanted:
            continue
        result = run_case(item, repo, args.python, fixtures, out)
        results[item.name] = result
        print(f"{result['verdict']:9s} {item.name:40s} rc={result['rc']} {result['seconds']:6.1f}s  {result['said']}",
              flush=True)
        order = [c.name for c in CASES]
        results_file.write_text(json.dumps(sorted(results.values(), key=lambda r: order.index(r["name"])), indent=1))
    write_table(sorted(results.values(), key=lambda r: [c.name for c in CASES].index(r["name"])), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
