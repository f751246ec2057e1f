"""Process grid: TP × PP × DP groups from DeepSpeed's topology, plus the tensor-parallel handle layers use."""
from __future__ import annotations

import datetime
import importlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from .random import RNGTracker


@dataclass(frozen=True)
class TPGroup:
    """What a tensor-parallel layer needs: its group, size and rank, and the per-rank RNG stream."""

    size: int = 1
    rank: int = 0
    group: Any = None
    rng: RNGTracker = field(default_factory=RNGTracker, compare=False)


SINGLE = TPGroup()  # no tensor parallelism: layers behave as plain modules


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group of whichever launcher started us (deepspeed, torchrun, or plain python).

    On CPU the backend is gloo and DeepSpeed's shared-memory inference op, which it would otherwise
    JIT-compile at init, is skipped. A stuck collective raises after `timeout_s`.
    """
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # a launcher sets it; a single plain-python process takes a free port, not a fixed one another job holds
        os.environ["MASTER_PORT"] = str(free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"
    import deepspeed

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    if cuda:
        # srun --gpus-per-task (or --gpu-bind) shows each task only its own GPUs, numbered from 0; unbound, a task
        # sees the node's GPUs and its LOCAL_RANK is below their count, so this is LOCAL_RANK itself.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    else:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))


def comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def uses_cuda() -> bool:
    """Whether this process keeps state on the GPU (CUDA RNG streams, memory statistics, the device's peak).

    Under a process group: exactly when its backend is NCCL, so a gloo process on a GPU machine (a CPU run, the
    offline checkpoint writer's workers) never opens a CUDA context. Without one (single-process evaluation,
    generation, analysis): when CUDA is available and DS_ACCELERATOR does not name another accelerator, the rule
    init_distributed uses to pick NCCL.
    """
    if dist.is_initialized():
        return dist.get_backend() == "nccl"
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


class ProcessGrid:
    """Ranks laid out by DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model; TP fastest).

    Wraps DeepSpeed's own PipelineParallelGrid, which is the mpu interface its engine expects, and adds
    the TPGroup handed to our layers. The pipeline engine builds an identical grid from the same
    topology, so both agree on every rank's coordinates.
    """

    def __init__(self, tp: int = 1, pp: int = 1):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

        if not dist.is_initialized():
            init_distributed()
        world = dist.get_world_size()
        if world % (tp * pp):
            raise ConfigError(f"parallel.tp={tp} × parallel.pp={pp} = {tp * pp} does not divide the {world} "
                              f"launched processes; launch a multiple of {tp * pp} processes or change tp/pp")
        self.tp_size, self.pp_size, self.dp_size = tp, pp, world // (tp * pp)
        self.topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=self.dp_size)
        self.mpu = PipelineParallelGrid(topology=self.topology)
        coord = self.topology.get_coord(dist.get_rank())
        self.rank = dist.get_rank()
        self.tp_rank, self.pp_rank, self.dp_rank = coord.model, coord.pipe, coord.data
        self.tp = TPGroup(tp, self.tp_rank, self.mpu.get_slice_parallel_group() if tp > 1 else None)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        return (f"world {self.tp_size * self.pp_size * self.dp_size} = TP {self.tp_size} × PP {self.pp_size} × "
                f"DP {self.dp_size} (TP fastest); rank {self.rank} is tp {self.tp_rank}, pp {self.pp_rank}, "
                f"dp {self.dp_rank}")

    def seed(self, seed: int) -> None:
        """Seed the RNG streams: the default stream agrees across TP ranks (replicated activations such as
        residual dropout) and differs across pipeline stages; the TP stream differs across TP ranks
        (dropout on sharded heads)."""
        torch.manual_seed(seed + 100 * self.pp_rank)
        self.tp.rng.seed(seed + 2718 + 100 * self.pp_rank + self.tp_rank)
