"""Real launch infrastructure for the launch tests, installed and started by the tests themselves: a one-node
Slurm cluster on localhost (Debian's slurm-wlm with munge) and Open MPI. Where that is impossible (not root, no
apt-get, no package mirror) the tests skip and say why.

The Slurm cluster lives in a temporary directory: its slurm.conf (found by every Slurm command and daemon through
SLURM_CONF), state, spool, logs and pid files; only munged uses the system's /run/munge and key. Daemons are
stopped by the pids in their pid files, never by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from megamoe.utils import free_port

APT_TIMEOUT_S = 600


def install_debian_packages(packages: list[str], binary: str) -> str | None:
    """Install `packages` unless `binary` is already on PATH; None on success, else why it cannot be done."""
    if shutil.which(binary):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{binary} is missing and packages can only be installed as root with apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S)
        if proc.returncode != 0:
            return f"{' '.join(cmd[:3])} failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
    return None if shutil.which(binary) else f"{binary} still missing after installing {packages}"


def slurm_conf(root: Path, node: str, hardware: str) -> str:
    """slurm.conf of a one-node cluster on 127.0.0.1: no systemd, cgroups or accounting; root runs everything."""
    return "\n".join([
        "ClusterName=megamoe-test", f"SlurmctldHost={node}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CryptoType=crypto/munge", "MpiDefault=none", "MailProg=/bin/true",
        "AuthInfo=cred_expire=20",  # a requeued job waits this long to start again (default 120 s)
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
        "SlurmdParameters=config_overrides",  # the node's cores as configured, not as detected
        "GresTypes=gpu",  # the job script asks for GPUs per node: this node offers four stand-ins (gres.conf)
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        f"{hardware} Gres=gpu:4 NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP", ""])


CORES = 4
"""The node's cores and stand-in GPUs: a job may run four tasks."""


class SlurmCluster:
    """munged + slurmctld + slurmd on this machine, configured under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self.pid_files = [root / "slurmd.pid", root / "slurmctld.pid"]

    def start(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        node = socket.gethostname().split(".")[0]
        hardware = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        memory = int(re.search(r"RealMemory=(\d+)", hardware)[1])
        hardware = re.sub(r"RealMemory=\d+", f"RealMemory={memory * 9 // 10}", hardware)  # or the node drains
        # At least four cores, one task each, however few this machine has (slurmd accepts it: config_overrides).
        hardware = re.sub(r"CPUs=\d+ Boards=\d+ SocketsPerBoard=\d+ CoresPerSocket=\d+ ThreadsPerCore=\d+",
                          lambda m: m[0] if int(re.search(r"CPUs=(\d+)", m[0])[1]) >= CORES else
                          f"CPUs={CORES} Boards=1 SocketsPerBoard=1 CoresPerSocket={CORES} ThreadsPerCore=1", hardware)
        (self.root / "slurm.conf").write_text(slurm_conf(self.root, node, hardware))
        # Four "GPUs" backed by harmless character devices (nothing opens them: no cgroup device limits here).
        (self.root / "gres.conf").write_text("".join(f"Name=gpu File=/dev/{name}\n"
                                                     for name in ("null", "zero", "full", "urandom")))
        self._start_munge()
        for daemon in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd"):
            subprocess.run([daemon], env=self.env, check=True, timeout=60)
        self._wait_idle()

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # already running
        for path in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(path).mkdir(parents=True, exist_ok=True)
            shutil.chown(path, "munge", "munge")
        os.chmod("/run/munge", 0o755)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=60)
        self.pid_files.append(Path("/run/munge/munged.pid"))
        time.sleep(1)

    def _wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout
            if out.strip() == "idle":
                return
            time.sleep(1)
        raise RuntimeError(f"the Slurm node did not become idle: sinfo says {out.strip()!r}; see {self.root}")

    def stop(self) -> None:
        for pid_file in self.pid_files:
            if pid_file.is_file():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        time.sleep(2)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=cwd, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch refused the job: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """scontrol's fields of the job (JobState, ExitCode, Restarts, ...)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                             env=self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until the job has ended (sbatch --wait backs off to tens of seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return job
            time.sleep(1)
        subprocess.run(["scancel", str(job_id)], env=self.env)
        raise TimeoutError(f"job {job_id} did not end within {timeout:.0f} s: {self.job(job_id)}")
