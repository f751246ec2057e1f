"""Process grid: TP × SP × PP × DP groups from DeepSpeed's topology, plus the TP and SP handles layers use."""
from __future__ import annotations

import datetime
import importlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from .random import RNGTracker


@dataclass(frozen=True)
class TPGroup:
    """What a tensor-parallel layer needs: its group, size and rank, and the per-rank RNG stream."""

    size: int = 1
    rank: int = 0
    group: Any = None
    rng: RNGTracker = field(default_factory=RNGTracker, compare=False)


SINGLE = TPGroup()  # no tensor parallelism: layers behave as plain modules


@dataclass(frozen=True)
class SPGroup:
    """What a sequence-parallel layer needs: each of `size` ranks holds positions [rank·s, (rank+1)·s) of every
    sample (s = seq_length / size) and attention exchanges heads for positions with the others of `group`."""

    size: int = 1
    rank: int = 0
    group: Any = None


NO_SP = SPGroup()  # the whole sequence on every rank


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

    Sequence parallelism (SP) lives inside the topology's data axis: data coordinate = dp_rank · SP + sp_rank,
    so SP ranks sit next to each other after TP (world = TP × SP × PP × DP). DeepSpeed sees the SP ranks as data
    parallel, which is what they are for the weights: every one holds them all and contributes a gradient, and
    gradients and ZeRO-1 partitions go over the whole data axis. The loss makes the average over that axis the
    right one (`token_weights`), and samples are read per true DP rank.
    """

    def __init__(self, tp: int = 1, pp: int = 1, sp: int = 1):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

        if not dist.is_initialized():
            init_distributed()
        self.tp_size, self.pp_size, self.sp_size = tp, pp, sp
        self.dp_size = ParallelConfig(tp=tp, pp=pp, sp=sp).data_parallel_size(dist.get_world_size())
        self.data_size = sp * self.dp_size  # DeepSpeed's data-parallel world: the SP and DP ranks
        self.topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=self.data_size)
        self.mpu = PipelineParallelGrid(topology=self.topology)
        coord = self.topology.get_coord(dist.get_rank())
        self.rank = dist.get_rank()
        self.tp_rank, self.pp_rank, self.data_rank = coord.model, coord.pipe, coord.data
        self.dp_rank, self.sp_rank = divmod(coord.data, sp)
        self.tp = TPGroup(tp, self.tp_rank, self.mpu.get_slice_parallel_group() if tp > 1 else None)
        self.sp = SPGroup(sp, self.sp_rank, self._sp_group() if sp > 1 else None)

    def _sp_group(self):
        """The SP ranks of this rank's (pipe, dp, model) coordinates. Every rank creates every group, in one order."""
        mine = None
        for pipe in range(self.pp_size):
            for dp in range(self.dp_size):
                for model in range(self.tp_size):
                    ranks = [self.topology.get_rank(pipe=pipe, data=dp * self.sp_size + s, model=model)
                             for s in range(self.sp_size)]
                    group = dist.new_group(ranks)
                    if self.rank in ranks:
                        mine = group
        return mine

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        sp = f" × SP {self.sp_size}" if self.sp_size > 1 else ""
        sp_rank = f", sp {self.sp_rank}" if self.sp_size > 1 else ""
        return (f"world {self.tp_size * self.sp_size * self.pp_size * self.dp_size} = TP {self.tp_size}{sp} × PP "
                f"{self.pp_size} × DP {self.dp_size} (TP fastest{', then SP' if sp else ''}); rank {self.rank} is tp "
                f"{self.tp_rank}{sp_rank}, pp {self.pp_rank}, dp {self.dp_rank}")

    def seed(self, seed: int) -> None:
        """Seed the RNG streams: the default stream agrees across TP ranks (replicated activations such as
        residual dropout) and differs across pipeline stages and SP ranks (each holds other positions); the TP
        stream differs across TP ranks (dropout on sharded heads)."""
        torch.manual_seed(seed + 100 * self.pp_rank + 7919 * self.sp_rank)
        self.tp.rng.seed(seed + 2718 + 100 * self.pp_rank + self.tp_rank + 7919 * self.sp_rank)
