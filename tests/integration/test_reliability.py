"""A run dies, a rank dies, a checkpoint is damaged, a loss goes NaN: megamoe loses nothing and never hangs (issue 10).

Launched runs (`deepspeed --num_gpus 2 launchers/pretrain.py`, fp32, CPU):
- SIGKILL of the whole launch at a random step, then a new launch resuming from the last checkpoint: the losses
  of every later step equal the uninterrupted run's bit for bit (EP=2, ZeRO-2, dropout on; a top-k model with
  expert-bias buffers, and a PEER model whose query BatchNorm statistics must come back);
- SIGKILL of one rank: the launcher ends every other rank within seconds, exits non-zero and names the rank.
In-process runs (tests.helpers.spawn):
- a save that dies half-way leaves `latest` on the previous checkpoint, which still loads; keep_last prunes;
- a truncated or altered checkpoint file, or one whose pickle would run code, is refused naming the file;
- non-finite losses skip their steps (weights and optimizer untouched, counted), too many in a row abort, and
  non-finite weights are never checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, launch_command, run_launch, spawn, tiny_config

STEPS = 14
LAUNCH_TIMEOUT_S = 300
MODELS = {
    "topk_ep2_expert_bias": ["moe.num_experts=4", "moe.ffn_hidden_size=64", "moe.router_enable_expert_bias=true",
                             "parallel.expert_model_parallel_size=2"],
    "peer_ep2_batchnorm": ["moe.variant=peer", "moe.num_experts=256", "moe.num_heads=2", "moe.topk_per_head=4",
                           "moe.key_dim=16", "parallel.expert_model_parallel_size=2"],
}


def _command(data: dict, log_dir: Path, *overrides: str) -> list[str]:
    return launch_command(data, log_dir, f"train.train_iters={STEPS}", "train.eval_interval=7", *overrides)


def _losses(log_dir: Path) -> dict[int, float]:
    path = log_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = run_launch(cmd, LAUNCH_TIMEOUT_S)
    port = cmd[cmd.index("--master_port") + 1]  # DeepSpeed's CPU all-reduce names its /dev/shm files by it
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert not left, f"the run left {left} in /dev/shm (RAM)"
    return proc


def _wait_for_step(proc: subprocess.Popen, log_dir: Path, step: int, output: Path) -> None:
    """Until the launch logs step `step`; fails if it ends first or takes longer than LAUNCH_TIMEOUT_S."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while max(_losses(log_dir), default=0) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {output.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} was never reached"
        time.sleep(0.05)


def _launch_and_kill_at(cmd: list[str], log_dir: Path, step: int) -> None:
    """Start the launch in its own process group and SIGKILL all of it once step `step` is logged."""
    output = log_dir.parent / f"{log_dir.name}.out"  # a file, not a pipe nobody reads while it fills
    with output.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_step(proc, log_dir, step, output)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tiny_data, tmp_path, model):
    full = tmp_path / "full"
    _run(_command(tiny_data, full, *MODELS[model], "checkpoint.save=null"))
    kill_step = random.Random().randint(3, STEPS - 3)  # printed below: a failure names the step
    killed = tmp_path / "killed"
    cmd = _command(tiny_data, killed, *MODELS[model], "checkpoint.save_interval=1")
    _launch_and_kill_at(cmd, killed, kill_step)
    ckpt = killed / "checkpoints"
    resumed_from = int((ckpt / "latest").read_text().strip().split("_")[1])
    _run([*cmd, f"checkpoint.load={ckpt}", f"logging.log_dir={tmp_path / 'resumed'}"])
    want, got = _losses(full), _losses(tmp_path / "resumed")
    print(f"{model}: killed after step {kill_step}, resumed from iter {resumed_from}")
    assert sorted(got) == list(range(resumed_from + 1, STEPS + 1))
    for step, loss in got.items():
        assert loss == want[step], f"step {step}: resumed {loss!r} vs uninterrupted {want[step]!r}"


def test_a_dead_rank_ends_the_run_within_seconds_and_is_named(tiny_data, tmp_path):
    log_dir, output = tmp_path / "run", tmp_path / "run.out"
    with output.open("w") as out:
        proc = subprocess.Popen(_command(tiny_data, log_dir, "train.train_iters=400", "checkpoint.save=null"),
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_step(proc, log_dir, 3, output)
        victim = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _is_rank_1(pid, log_dir))
        start = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.monotonic() - start
    out = output.read_text()
    print(f"rank 1 killed: the launch exited with {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode != 0 and elapsed < 60
    assert any("--local_rank=1" in line and "exits with return code" in line for line in out.splitlines())


def _is_rank_1(pid: str, log_dir: Path) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return False
    return "--local_rank=1" in args and f"logging.log_dir={log_dir}" in args


# ---- in-process ----

def _trainer(data: dict, *overrides: str):
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer

    cfg = tiny_config(data, *overrides)
    return build_trainer(cfg, startup.check(cfg))


def _steps(trainer, steps: int) -> None:
    """Train on to `steps` optimizer steps in all (megamoe's loop: logging, checkpoints, skipped-step counting)."""
    from dataclasses import replace

    from megamoe.train.loop import train
    from megamoe.train.metrics import ExpertLoadLog, MetricsWriter

    trainer.cfg = replace(trainer.cfg, train=replace(trainer.cfg.train, train_iters=steps))
    metrics = MetricsWriter(trainer.cfg)
    try:
        train(trainer, metrics, ExpertLoadLog(trainer.cfg.logging.log_dir))
    finally:
        metrics.close()


def _crash_during_save(data: dict, save: str) -> dict:
    from megamoe.train import checkpoint, reshard, saving

    ckpt = [f"checkpoint.save={save}", "checkpoint.save_interval=1", "checkpoint.keep_last=2"]
    trainer = _trainer(data, *ckpt)
    _steps(trainer, 3)  # checkpoints 1, 2, 3; keep_last=2 leaves 2 and 3
    kept = sorted(p.name for p in Path(save).glob("iter_*"))

    def dies_half_way(snapshot, directory, group=None):
        directory.parent.mkdir(parents=True, exist_ok=True)
        (directory.parent / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
        raise SystemExit("killed during save")

    reshard.write = dies_half_way  # the first write of a save
    trainer.progress = checkpoint.Progress(iteration=4, consumed_samples=trainer.progress.consumed_samples + 4)
    with contextlib.suppress(SystemExit):  # the process "dies" inside DeepSpeed's save
        saving.save(trainer.engine, trainer.cfg, trainer.progress, trainer.groups)
    latest = (Path(save) / "latest").read_text()
    resumed = _trainer(data, *ckpt, f"checkpoint.load={save}")
    return {"kept": kept, "latest": latest, "resumed_at": resumed.progress.iteration,
            "partial_left": (Path(save) / ".partial" / "iter_0000004").is_dir()}


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tiny_data, tmp_path):
    got = spawn(_crash_during_save, 1, tiny_data, str(tmp_path / "ckpt"))[0]
    assert got["kept"] == ["iter_0000002", "iter_0000003"], "keep_last=2"
    assert got["latest"] == "iter_0000003" and got["resumed_at"] == 3
    assert got["partial_left"]  # the dead save's files stayed out of sight


def _load_damaged(data: dict, save: str, damage: str) -> str:
    from megamoe.train import checkpoint, saving

    trainer = _trainer(data, f"checkpoint.save={save}")
    trainer.progress = checkpoint.Progress(iteration=1, consumed_samples=4)
    tag_dir = saving.save(trainer.engine, trainer.cfg, trainer.progress, trainer.groups)
    target = tag_dir / "mp_rank_00_model_states.pt"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "altered":
        data_ = bytearray(target.read_bytes())
        data_[len(data_) // 2] ^= 0xFF
        target.write_bytes(bytes(data_))
    else:  # a pickle that would run code, with a manifest that vouches for it
        (tag_dir / "exploit.pt").write_bytes(_exploit_pickle(Path(save) / "pwned"))
        from megamoe.train import integrity

        (tag_dir / integrity.MANIFEST).unlink()
        integrity.write_manifest(tag_dir)
    try:
        _trainer(data, f"checkpoint.load={save}")
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "loaded"


class _Exploit:
    """Unpickling this runs a shell command (the attack weights_only and the pickle scan stop)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _exploit_pickle(marker: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"state": _Exploit(marker)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "altered", "code"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tiny_data, tmp_path, damage):
    got = spawn(_load_damaged, 1, tiny_data, str(tmp_path / "ckpt"), damage)[0]
    expected = {"truncated": "mp_rank_00_model_states.pt has", "altered": "does not match its SHA-256",
                "code": "exploit.pt refers to"}[damage]
    assert got.startswith("CheckpointError") and expected in got, got
    assert not (tmp_path / "ckpt" / "pwned").exists(), "the pickle ran"


def _nonfinite(data: dict, save: str, nan_steps: list[int], limit: int, zero: int) -> dict:
    from megamoe.train import loop, saving

    trainer = _trainer(data, f"checkpoint.save={save}", "checkpoint.save_interval=1", f"deepspeed.zero_stage={zero}",
                       f"train.max_skipped_steps={limit}", "train.micro_batch_size=2", "train.global_batch_size=4")
    real, calls = loop.stage_output, {"n": 0}

    def poisoned(trainer_, batch, x):  # 2 micro-batches per step: step s is calls 2s-1, 2s
        calls["n"] += 1
        out = real(trainer_, batch, x)
        return out * float("nan") if (calls["n"] + 1) // 2 in nan_steps else out

    loop.stage_output = poisoned
    weights = {}
    error = None
    try:  # one step at a time to see the weights after each; in one go, to count skips in a row
        for step in range(1, 7) if limit > len(nan_steps) else [6]:
            _steps(trainer, step)
            weights[step] = torch.cat([p.detach().flatten().clone() for p in trainer.engine.module.parameters()])
    except loop.NonFiniteTraining as err:
        error = str(err)
    records = [json.loads(line) for line in (Path(trainer.cfg.logging.log_dir) / "metrics.jsonl").read_text()
               .splitlines()]
    skipped = [r["train/skipped_steps"] for r in records if "train/skipped_steps" in r]
    resumed = _trainer(data, f"checkpoint.load={save}", f"deepspeed.zero_stage={zero}", "train.micro_batch_size=2",
                       "train.global_batch_size=4") if error is None else None
    with torch.no_grad():
        next(trainer.engine.module.parameters()).fill_(float("inf"))
    try:
        saving.save(trainer.engine, trainer.cfg, trainer.progress, trainer.groups)
        refused = None
    except Exception as err:
        refused = str(err)
    return {"weights": weights, "error": error, "skipped": skipped, "refused": refused,
            "resumed_skipped": resumed.progress.skipped_steps if resumed else None,
            "latest": (Path(save) / "latest").read_text() if (Path(save) / "latest").exists() else None}


@pytest.mark.parametrize("zero", [0, 2])
def test_nonfinite_steps_are_skipped_counted_and_never_saved(tiny_data, tmp_path, zero):
    got = spawn(_nonfinite, 1, tiny_data, str(tmp_path / "ckpt"), [3, 4], 5, zero)[0]
    assert got["error"] is None
    w = got["weights"]
    assert torch.equal(w[2], w[3]) and torch.equal(w[3], w[4]), "a skipped step changed the weights"
    assert not torch.equal(w[4], w[5]) and torch.isfinite(w[6]).all(), "training resumed after the NaNs"
    assert got["skipped"][-1] == 2 and got["resumed_skipped"] == 2, "the count is kept across a resume"
    assert got["refused"] is not None and "hold NaN or Inf" in got["refused"]
    assert got["latest"] == "iter_0000006"


def test_too_many_nonfinite_steps_in_a_row_abort(tiny_data, tmp_path):
    got = spawn(_nonfinite, 1, tiny_data, str(tmp_path / "ckpt"), [2, 3, 4, 5, 6], 3, 2)[0]
    assert got["error"] is not None and "3 optimizer steps in a row (to step 4)" in got["error"], got["error"]
    shutil.rmtree(tmp_path, ignore_errors=True)


def _evaluate_with_data_workers(data: dict) -> dict:
    from torch.utils.data import dataloader

    from megamoe.data.loader import build_loader
    from megamoe.train.loop import evaluate

    trainer = _trainer(data, "data.num_workers=1", "train.eval_iters=2")
    forks = []

    def would_fork(self, loader):  # (this rank is a daemon process: it may not have children)
        forks.append(loader.num_workers)
        self._shutdown = True  # nothing started: its __del__ has nothing to shut down
        raise ChildProcessError

    dataloader._MultiProcessingDataLoaderIter.__init__ = would_fork
    loss = evaluate(trainer)["valid/loss"]
    with contextlib.suppress(ChildProcessError):
        next(iter(build_loader(trainer.datasets.train, 0, trainer.cfg, trainer.groups)))
    return {"loss": loss, "forks": forks}


def test_evaluation_forks_no_data_worker(tiny_data):
    """Validation reads its few batches in the rank: a fork() per evaluation of a rank running dozens of
    communication threads risks a worker that deadlocks (training data still has its workers)."""
    got = spawn(_evaluate_with_data_workers, 1, tiny_data)[0]
    assert math.isfinite(got["loss"]) and got["forks"] == [1], got


def _set_up_with_extensions_dir(data: dict, extensions: str) -> list[str]:
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions
    _trainer(data)
    return sorted(p.name for p in Path(extensions).iterdir()) if Path(extensions).is_dir() else []


def test_set_up_compiles_nothing(tiny_data, tmp_path):
    """DeepSpeed's CPU shared-memory all-reduce (for inference only) is not JIT-built: a rank killed during
    that build left torch's lock file behind, and every later launch waited on it forever."""
    assert spawn(_set_up_with_extensions_dir, 1, tiny_data, str(tmp_path / "extensions"))[0] == []


def _launch_processes(log_dir: Path) -> list[int]:
    """PIDs of the launch's processes still alive (their command lines name its log directory)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"logging.log_dir={log_dir}" in Path(f"/proc/{pid}/cmdline").read_text().split("\0"):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("how", ["sigterm_to_the_deepspeed_command", "ctrl_c"])
def test_a_stop_signal_to_the_launch_stops_every_process_after_a_checkpoint(how, tiny_data, tmp_path):
    """DeepSpeed's `deepspeed` command forwards no signal: a SIGTERM to it (a job scheduler, `kill`) left the node
    launcher and the ranks training as orphans. Ctrl-C reached the data workers too, which died under their ranks
    (tracebacks, no checkpoint). Both now end the whole job at the next step boundary with a stop checkpoint."""
    log_dir, output = tmp_path / "run", tmp_path / "run.out"
    with output.open("w") as out:
        proc = subprocess.Popen(_command(tiny_data, log_dir, "train.train_iters=100000"), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    try:
        _wait_for_step(proc, log_dir, 3, output)
        if how == "ctrl_c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to its foreground process group
        else:
            os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while _launch_processes(log_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _launch_processes(log_dir)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _launch_processes(log_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = output.read_text()
    assert not left, f"processes {left} still running:\n{text[-3000:]}"
    stopped_at = int((log_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 3 <= stopped_at < 1000 and stopped_at == max(_losses(log_dir)), text[-3000:]  # it stopped, not ran on
    assert not re.search(r"^\[rank\d\]: Traceback|DataLoader worker .* is killed", text, re.MULTILINE), text[-3000:]
