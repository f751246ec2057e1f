"""Saving and resuming training checkpoints with a live engine (the layout itself: checkpoint/deepspeed_layout.py).

A save is DeepSpeed's, from every rank; after a barrier the ranks hash a share of the files each, and
rank 0 writes the completion marker with every checksum and only then points `latest` at it, so
`latest` never names a half-written or unverifiable checkpoint. Resuming verifies the candidate the
same way (every rank a share) and falls back to the newest checkpoint that verifies. The engine's
checkpoint loader is replaced by one that unpickles nothing but plain data and DeepSpeed's own classes.
"""
from __future__ import annotations

import json
import sys
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import deepspeed_layout as layout
from ..checkpoint.consolidated import CheckpointError

LOCK = "megaqkv_run.lock"


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def problems_collectively(tag_dir: Path) -> list[tuple[str, str]]:
    """layout.verify with the files shared out over every rank of the job; every rank gets every problem."""
    if not dist.is_initialized():
        return layout.verify(tag_dir)
    return [p for share in _gather(layout.verify(tag_dir, (dist.get_rank(), dist.get_world_size()))) for p in share]


def use_safe_loader(engine) -> None:
    """Every file DeepSpeed's engine loads goes through layout.safe_load (weights_only=True, DeepSpeed's own
    classes allowed), so resuming never executes code from a checkpoint."""
    engine.checkpoint_engine.load = lambda path, map_location=None: layout.safe_load(path, map_location)


def rng_state(tp_rng) -> dict:
    state = {"torch": torch.get_rng_state(), "tp": tp_rng.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, tp_rng) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tp_rng.set_state(state["tp"])


def save(engine, directory: str | Path, step: int, client_state: dict, keep_last: int,
         loss: float | None = None) -> Path:
    directory = Path(directory)
    tag = layout.tag_for(step)
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    tag_dir = directory / tag
    names = [layout.checkpoint_files(tag_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)
    rank, world = dist.get_rank(), dist.get_world_size()
    files = {}
    for share in _gather({n: layout.digest(tag_dir / n) for n in names[0][rank::world]}):
        files.update(share)
    if rank == 0:
        layout.write_marker(tag_dir, step, files, loss, consumed_samples=client_state["consumed_samples"])
        layout.point_latest(directory, tag)
        layout.prune(directory, keep_last, keep=tag)
    dist.barrier()
    return tag_dir


class RunLock:
    """One run per checkpoint directory: rank 0 creates `megaqkv_run.lock` (host, PID, start time, command)
    exclusively and removes it on exit. A lock left by a process of this host that no longer exists is stale
    and taken over with a warning; any other holder stops the second run with a message naming it."""

    def __init__(self, directory: Path, say=print):
        self.path = directory / LOCK
        self.held = False
        directory.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise CheckpointError(
                        f"{directory}: another run is using this checkpoint directory (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}: {holder.get('command', '?')}); "
                        f"wait for it, or use another --save directory. If that run is gone (it ran on another "
                        f"host), delete {self.path}")
                say(f"warning: {self.path} was left by pid {holder.get('pid')} on {holder.get('host')}, which is no "
                    "longer running; taking it over")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def layout_of(grid) -> dict:
    return {"tp": grid.tp_size, "pp": grid.pp_size, "dp": grid.dp_size}


def client_state(cfg, grid, step: int, consumed: int, universal_info: dict) -> dict:
    """What our checkpoints add to DeepSpeed's: position, RNG, the resolved config (plain data), layout."""
    return {"iteration": step, "consumed_samples": consumed, "rng": rng_state(grid.tp.rng), "config": cfg.to_dict(),
            "layout": layout_of(grid), "universal_checkpoint_info": universal_info}


def universal_checkpoint_info(cfg, tp: int) -> dict:
    """What DeepSpeed's ds_to_universal needs to merge TP shards of this model: exact names of the replicated,
    row-parallel and vocabulary-padded parameters over all pipeline stages."""
    from ..model import GPT
    from ..model.pipeline import pipe_name
    from ..parallel.grid import TPGroup
    from ..parallel.layers import padded_vocab_size
    from ..parallel.sharding import param_spec

    with torch.device("meta"):
        names = [n for n, _ in GPT(cfg.model, tp=TPGroup(size=tp)).named_parameters()]
    kinds: dict[str, list[str]] = {"vocab": [], "replicated": [], "row": []}
    for plain in names:
        spec = param_spec(plain, cfg.model, tp)
        kind = "vocab" if spec.vocab else "replicated" if spec.dim is None else "row" if spec.dim == 1 else None
        if kind:
            kinds[kind].append("^" + pipe_name(plain, cfg.model).replace(".", r"\.") + "$")
    return {"universal_checkpoint_version": 0.4, "tp_replicated_parameter_patterns": kinds["replicated"],
            "parameter_with_row_parallelism_patterns": kinds["row"], "vocabulary_parameter_patterns": kinds["vocab"],
            "original_vocab_size": cfg.model.vocab_size,
            "padded_vocab_size": padded_vocab_size(cfg.model.vocab_size, tp) if tp > 1 else cfg.model.vocab_size}
