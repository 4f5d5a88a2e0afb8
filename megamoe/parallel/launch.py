"""Where the ranks come from: the launcher's environment mapped to torch.distributed's variables.

torch.distributed (and DeepSpeed, and megatron) read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
`deepspeed` and `torchrun` set them; a Slurm job step (`srun`) and `mpirun` do not, so they are derived here,
once, before the configuration is validated for the world size:

- srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; the master is the step's first node (scontrol), the
  port follows the job id so that concurrent jobs on a node do not collide;
- mpirun (Open MPI, MPICH, Intel MPI, PMIx): ranks from mpi4py's COMM_WORLD, local ranks from its shared-memory
  split, the master address and a free port chosen on rank 0 and broadcast (collectives still run on NCCL or
  gloo: the pip torch wheel has no MPI backend);
- nothing: a world of one process.
Variables already set win (a user's MASTER_ADDR on a multi-homed node, say).
"""

from __future__ import annotations

import os
import socket
import subprocess

from megamoe.utils import free_port

MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
SLURM_PORT_BASE = 29500


def discover_ranks() -> str:
    """Set torch.distributed's variables from the launcher; returns which launcher it found."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torch"  # deepspeed, torchrun, or set by hand
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:
        _set(_slurm_ranks())
        return "slurm"
    if any(name in os.environ for name in MPI_SIZE_VARIABLES):
        _set(_mpi_ranks())
        return "mpi"
    return "none"


def world_of_one() -> None:
    """No launcher (`python launchers/pretrain.py ...`): torch.distributed's variables for a world of this one
    process, its master on this host at MASTER_PORT if set, else at a free port."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))


def _set(values: dict[str, str]) -> None:
    for key, value in values.items():
        os.environ.setdefault(key, value)


def _slurm_ranks() -> dict[str, str]:
    env = os.environ
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]))
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(per_node[min(int(env.get("SLURM_NODEID", "0")), len(per_node) - 1)]),
            "MASTER_ADDR": first_host(nodes),
            "MASTER_PORT": str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 1000)}


def tasks_per_node(value: str) -> list[int]:
    """Slurm's compressed per-node task counts ('2(x3),1') expanded: [2, 2, 2, 1]."""
    counts = []
    for part in value.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ('node[01-04]' -> 'node01'), by `scontrol show hostnames`."""
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"cannot expand SLURM node list {nodelist!r} with scontrol ({err}); set MASTER_ADDR "
                           "to the first node's address") from None
    return out[0]


def _mpi_ranks() -> dict[str, str]:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("launched by mpirun but mpi4py is not installed: pip install -e '.[mpi]' (it needs an "
                           "MPI library, e.g. Debian's openmpi-bin libopenmpi-dev)") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    master = None
    if comm.rank == 0:
        master = (os.environ.get("MASTER_ADDR") or _own_address(), os.environ.get("MASTER_PORT") or free_port())
    addr, port = comm.bcast(master, root=0)
    values = {"RANK": str(comm.rank), "WORLD_SIZE": str(comm.size), "LOCAL_RANK": str(local.rank),
              "LOCAL_WORLD_SIZE": str(local.size), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
    local.Free()
    return values


def _own_address() -> str:
    """This host's address as the other hosts reach it (the interface of the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))  # no packet is sent: this only selects the outgoing interface
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"
