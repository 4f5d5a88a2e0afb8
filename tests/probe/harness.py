"""The probe's harness: a case's context (its directory, the fixture's dataset and checkpoint, the commands it
runs), the fixtures, helpers the cases share, and running one case (its verdict included)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from megamoe.utils import free_port  # stdlib only: the probe imports no torch

HERE = Path(__file__).resolve().parents[2]  # the checkout this probe is in
CORPUS = Path("data") / "shakespeare-train.jsonl.gz"  # under the probed checkout
VOCAB = 500  # megatron pads the embedding to 512: ids 500-511 are padding rows, 512+ are outside it
TIMEOUT_S = 150
SETTLE_S = 45  # after a signal: how long every process of the launch gets to end


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


def write_dataset(prefix: str, docs: list[list[int]], dtype: str = "uint16") -> None:
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


