"""Map the environment of srun or mpirun to the env:// variables torch.distributed reads.

deepspeed and torchrun give every process RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; srun and
mpirun give their own variables instead. Unmapped, N copies of pretrain.py started by srun would each see no RANK
and train as N separate one-process runs, all writing one checkpoint directory.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, MutableMapping
from typing import NamedTuple

from ..config import ConfigError

DEFAULT_PORT = "29500"
_TAKE_OVER = ("export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process yourself, "
              "or start them with deepspeed or torchrun")


class LauncherEnvError(ConfigError):
    """Several processes were started, but not in a way that lets them find each other."""


class Launcher(NamedTuple):
    name: str
    rank: str
    size: str
    local_rank: str
    local_size: str | None  # ranks on this node; == size means one node, so rank 0 is on this host


# In order of precedence. mpirun inside a SLURM allocation starts its daemons with srun, so its ranks inherit
# SLURM variables describing the daemons: an MPI launcher's own variables come first.
LAUNCHERS = (
    Launcher("Open MPI (mpirun)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE"),
    Launcher("MPICH/Intel MPI (mpiexec)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    # The step's task count, not SLURM_NTASKS: a batch script or an salloc shell sees SLURM_PROCID=0 and the
    # allocation's SLURM_NTASKS, yet is one process (salloc's interactive step is a step of one task, and srun
    # --preserve-env keeps the allocation's SLURM_NTASKS); srun sets SLURM_STEP_NUM_TASKS for its tasks only.
    Launcher("SLURM (srun)", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None),
)


def launcher_rank(env: Mapping[str, str] = os.environ) -> str:
    """This process's rank as its launcher numbers it ("0" when there is none): who prints, even before mapping."""
    for name in ("RANK", *(l.rank for l in LAUNCHERS)):
        if name in env:
            return env[name]
    return "0"


def map_launcher_env(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in `env` from srun's or mpirun's variables.

    Does nothing when RANK is set (deepspeed, torchrun or the user has decided) or when the launcher started a
    single process. Returns a line for rank 0 to print, or None; raises LauncherEnvError for a launch of several
    processes that cannot be mapped, since each would otherwise train alone.
    """
    if "RANK" in env:
        return None
    present = [l for l in LAUNCHERS if l.size in env]
    if not present:
        if _int(env, "SLURM_NTASKS", default=1) > 1:
            return (f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not started by srun: running as one "
                    "process (srun python pretrain.py ... starts one per task)")
        return None
    first = present[0]
    size = _int(env, first.size)
    if size <= 1:
        return None
    # srun --mpi=pmi2 sets PMI_RANK and PMI_SIZE but not MPI_LOCALRANKID: SLURM's variables then describe the
    # same processes, which a world of the same size confirms.
    chosen = next((l for l in present if _complete(env, l) and _int(env, l.size) == size), None)
    if chosen is None:
        missing = next(v for v in (first.rank, first.local_rank) if v not in env)
        raise LauncherEnvError(f"{first.name} started {size} processes ({first.size}={size}) but {missing} is not "
                               f"set, so this process cannot tell its place; {_TAKE_OVER}")
    rank, local_rank = _int(env, chosen.rank), _int(env, chosen.local_rank)
    if not (0 <= rank < size and 0 <= local_rank < size):
        raise LauncherEnvError(f"{chosen.rank}={rank} and {chosen.local_rank}={local_rank} do not fit in "
                               f"{chosen.size}={size}; {_TAKE_OVER}")
    addr = env.get("MASTER_ADDR") or _master_addr(env, chosen, size)
    port = env.get("MASTER_PORT") or DEFAULT_PORT
    env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank), MASTER_ADDR=addr, MASTER_PORT=port)
    return (f"launcher: {chosen.name}, {size} processes: RANK/WORLD_SIZE/LOCAL_RANK from "
            f"{chosen.rank}/{chosen.size}/{chosen.local_rank}, MASTER_ADDR={addr} MASTER_PORT={port}")


def _complete(env: Mapping[str, str], launcher: Launcher) -> bool:
    return all(v in env for v in (launcher.rank, launcher.size, launcher.local_rank))


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in env and default is not None:
        return default
    try:
        return int(env[name])
    except ValueError:
        raise LauncherEnvError(f"{name}={env[name]!r} is not a whole number; {_TAKE_OVER}") from None


def _master_addr(env: Mapping[str, str], launcher: Launcher, size: int) -> str:
    """Where rank 0 listens: the first host of the SLURM step, this host when all ranks are on it, else asked for."""
    if launcher.name.startswith("SLURM"):
        return _first_slurm_host(env)
    if launcher.local_size and env.get(launcher.local_size) == str(size):
        return "127.0.0.1"
    raise LauncherEnvError(f"{launcher.name} started {size} processes on several nodes, but MASTER_ADDR is not set: "
                           "export MASTER_ADDR=<the host of rank 0> (and MASTER_PORT, default 29500) to every rank, "
                           "e.g. mpirun -x MASTER_ADDR=$(hostname) ...")


def _first_slurm_host(env: Mapping[str, str]) -> str:
    """Rank 0 runs on the first node of the step (srun places tasks in node-list order)."""
    var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)), None)
    if var is None:
        raise LauncherEnvError("srun started several tasks, but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: "
                               "export MASTER_ADDR=<the host of rank 0>")
    nodelist = env[var]
    if not any(c in nodelist for c in "[,"):
        return nodelist  # a single host
    try:
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        hosts = proc.stdout.split() if proc.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        hosts = []
    if not hosts:
        raise LauncherEnvError(f"cannot expand {var}={nodelist} to find rank 0's host (scontrol show hostnames "
                               "failed or is missing): export MASTER_ADDR="
                               '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) before srun')
    return hosts[0]
