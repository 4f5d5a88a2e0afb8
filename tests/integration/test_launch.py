"""Launching for real: the Slurm job script under a one-node Slurm cluster that this test installs (Debian's
slurm-wlm), starts on localhost and stops, and `mpirun` (Open MPI from Debian) with ranks from mpi4py.

- sbatch launchers/slurm/pretrain.sbatch: a 2-task training job (one task per "GPU": the test node offers two
  stand-ins) completes, with metrics and a checkpoint;
- checkpoint-and-requeue: SIGUSR1 to the job's tasks (what `#SBATCH --signal` sends before the time limit)
  makes training checkpoint and exit 75, the script requeues the job, and the second run resumes from that
  checkpoint and finishes;
- mpirun -np 2 python launchers/pretrain.py trains, every rank knowing its place from mpi4py.
Skipped, saying why, only where the software cannot be installed (not root, no apt-get or no mirror).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import SlurmCluster, install_debian_packages
from tests.helpers import ROOT, launch_command, run_launch, tiny_launch_overrides

JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if why := install_debian_packages(["slurm-wlm"], "sbatch"):
        pytest.skip(f"no Slurm: {why}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _submit(slurm: SlurmCluster, data: dict, run_dir: Path, *extra: str, gpus: int = 2) -> int:
    """The real job script on 1 node x `gpus` tasks (one per stand-in GPU); the script adds
    checkpoint.save/load=CKPT_DIR itself."""
    overrides = [o for o in tiny_launch_overrides(data, run_dir) if not o.startswith("checkpoint.save=")]
    env = {"CONFIG": str(ROOT / "configs" / "tiny-dense.yaml"), "CKPT_DIR": str(run_dir / "checkpoints"),
           "VENV": sys.prefix, "MEGAMOE_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    return slurm.sbatch("--nodes=1", f"--ntasks-per-node={gpus}", f"--gpus-per-node={gpus}", "--cpus-per-task=1",
                        "--time=10", f"--output={run_dir / 'job.out'}",
                        str(ROOT / "launchers" / "slurm" / "pretrain.sbatch"), *overrides, *extra, env=env, cwd=ROOT)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]


def test_sbatch_runs_a_two_task_training_job(slurm, tiny_data, tmp_path):
    job_id = _submit(slurm, tiny_data, tmp_path, "train.train_iters=6", "train.eval_interval=6")
    job = slurm.wait(job_id, JOB_TIMEOUT_S)
    log = (tmp_path / "job.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log[-3000:]}"
    assert "world 2 (gloo)" in log and _steps(tmp_path) == list(range(1, 7)), log[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    print(f"job {job_id}: {job['JobState']} in {job.get('RunTime')}")


def test_a_signal_before_the_time_limit_checkpoints_requeues_and_resumes(slurm, tiny_data, tmp_path):
    job_id = _submit(slurm, tiny_data, tmp_path, "train.train_iters=60", "train.eval_interval=60",
                     "checkpoint.save_interval=1000")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not [s for s in _steps(tmp_path) if s >= 3]:  # training is under way
        assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()[-3000:]
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", str(job_id)], env=slurm.env, check=True)
    job = slurm.wait(job_id, JOB_TIMEOUT_S)
    log = (tmp_path / "job.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", f"{job}\n{log[-3000:]}"
    assert "requeueing job" in log and "restart 1" in log, log[-3000:]
    stopped = int(log.split("stopped at step ")[1].split()[0])
    assert f"resumed from {tmp_path / 'checkpoints' / f'iter_{stopped:07d}'}" in log, log[-3000:]
    assert _steps(tmp_path) == list(range(1, 61)), "the two runs together logged every step once"
    print(f"job {job_id}: stopped at step {stopped} on SIGUSR1, requeued, resumed and finished 60 steps")


ELASTIC = ["moe.num_experts=4", "moe.ffn_hidden_size=64", "parallel.expert_model_parallel_size=2",
           "model.hidden_dropout=0", "model.attention_dropout=0", "train.train_iters=30", "train.eval_interval=30",
           "checkpoint.save_interval=1000"]


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    return {r["step"]: r["train/loss"] for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r}


def test_a_job_requeued_on_fewer_gpus_continues_with_its_optimizer_state(slurm, tiny_data, tmp_path):
    """4 tasks checkpoint on SIGUSR1 and requeue; before the job starts again it is given 2 GPUs instead of 4 (what a
    requeue on fewer nodes does); the 2 tasks resume from the checkpoint with the optimizer state re-cut, and the
    losses after it equal an uninterrupted 4-process run's (fp32, dropout off)."""
    want = tmp_path / "uninterrupted"
    command = launch_command(tiny_data, want, *ELASTIC, "checkpoint.save=null")
    command[command.index("--num_gpus") + 1] = "4"
    run_launch(command, JOB_TIMEOUT_S)
    want_losses = _losses(want)
    run = tmp_path / "job"
    run.mkdir()
    job_id = _submit(slurm, tiny_data, run, *ELASTIC, gpus=4)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not [s for s in _steps(run) if s >= 3]:
        assert time.monotonic() < deadline and slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING"), \
            (run / "job.out").read_text()[-3000:]
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", str(job_id)], env=slurm.env, check=True)
    while not (slurm.job(job_id).get("JobState") == "PENDING" and slurm.job(job_id).get("Restarts") == "1"):
        assert time.monotonic() < deadline, f"{slurm.job(job_id)}\n{(run / 'job.out').read_text()[-3000:]}"
        time.sleep(0.2)
    # Requeued jobs wait AuthInfo's cred_expire (20 s) before starting again: time to resize it.
    for command in (["scontrol", "hold", str(job_id)], ["scontrol", "update", f"JobId={job_id}",
                                                         "TresPerNode=gres:gpu:2"],
                    ["scontrol", "update", f"JobId={job_id}", "NumTasks=2"], ["scontrol", "release", str(job_id)]):
        subprocess.run(command, env=slurm.env, check=True, capture_output=True)
    job = slurm.wait(job_id, JOB_TIMEOUT_S)
    log = (run / "job.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", f"{job}\n{log[-3000:]}"
    assert "megamoe: 4 tasks" in log and "megamoe: 2 tasks" in log, log[-3000:]
    stopped = int(log.split("stopped at step ")[1].split()[0])
    assert "re-cut for this layout" in log, log[-3000:]
    got = _losses(run)
    after = range(stopped + 1, 31)
    rel = max(abs(got[s] - want_losses[s]) / abs(want_losses[s]) for s in after)
    print(f"job {job_id}: 4 tasks stopped at step {stopped}, requeued on 2 GPUs; steps {stopped + 1}-30 "
          f"{[round(got[s], 6) for s in after][:5]}... vs uninterrupted {[round(want_losses[s], 6) for s in after][:5]}"
          f"..., max rel {rel:.1e}")
    assert rel <= 1e-6, rel


def test_mpirun_trains_with_ranks_from_mpi4py(tiny_data, tmp_path):
    if why := install_debian_packages(["openmpi-bin", "libopenmpi-dev"], "mpirun"):
        pytest.skip(f"no Open MPI: {why}")
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PYTHONWARNINGS=ignore",
           "-x", "DS_ACCELERATOR=cpu", sys.executable, str(ROOT / "launchers" / "pretrain.py"),
           "--config", str(ROOT / "configs" / "tiny-dense.yaml"), *tiny_launch_overrides(tiny_data, tmp_path),
           "train.train_iters=4", "train.eval_interval=4"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = run_launch(cmd, JOB_TIMEOUT_S, env=env)
    assert "world 2 (gloo)" in proc.stderr + proc.stdout
    assert _steps(tmp_path) == [1, 2, 3, 4]
