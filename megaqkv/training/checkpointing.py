"""Saving and resuming training checkpoints with a live engine (the layout itself: checkpoint/deepspeed_layout.py).

A save is DeepSpeed's, from every rank; after a barrier the ranks hash a share of the files each, and
rank 0 writes the completion marker with every checksum and only then points `latest` at it, so
`latest` never names a half-written or unverifiable checkpoint. Resuming verifies the candidate the
same way (every rank a share) and falls back to the newest checkpoint that verifies. The engine's
checkpoint loader is replaced by one that unpickles nothing but plain data and DeepSpeed's own classes.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import deepspeed_layout as layout
from ..checkpoint.consolidated import CheckpointError
from ..data.gpt_dataset import INDEX_VERSION
from ..parallel.grid import uses_cuda

LOCK = "megaqkv_run.lock"


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def problems_collectively(tag_dir: Path, check=layout.verify) -> list[tuple[str, str]]:
    """`check` (layout.verify, universal.problems) with the files shared out over every rank of the job; every
    rank gets every problem."""
    if not dist.is_initialized():
        return check(tag_dir)
    shares = gather(check(tag_dir, (dist.get_rank(), dist.get_world_size())))
    return list(dict.fromkeys(p for share in shares for p in share))  # an unreadable marker: once, not per rank


def use_safe_loader(engine) -> None:
    """Every file DeepSpeed's engine loads goes through layout.safe_load (weights_only=True, DeepSpeed's own
    classes allowed), so resuming never executes code from a checkpoint."""
    engine.checkpoint_engine.load = lambda path, map_location=None: layout.safe_load(path, map_location)


def rng_state(tp_rng) -> dict:
    """The RNG streams an exact resume needs; the CUDA one only where the run is on the GPU (uses_cuda)."""
    state = {"torch": torch.get_rng_state(), "tp": tp_rng.get_state()}
    if uses_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, tp_rng) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and uses_cuda():
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
    for share in gather({n: layout.digest(tag_dir / n) for n in names[0][rank::world]}):
        files.update(share)
    failure = [None]
    if rank == 0:
        try:
            layout.install_recovery_script(directory)
            layout.write_marker(tag_dir, step, files, loss, consumed_samples=client_state["consumed_samples"])
            layout.point_latest(directory, tag)
            layout.prune(directory, keep_last, keep=tag)
        except Exception as exc:  # noqa: BLE001 - every rank stops with it instead of waiting for rank 0
            failure = [f"{tag_dir}: saving failed after DeepSpeed wrote it: {exc!r}"]
    dist.broadcast_object_list(failure, src=0)
    if failure[0]:
        raise CheckpointError(failure[0])
    return tag_dir


def load_universal(engine, tag_dir: Path) -> dict:
    """DeepSpeed's own universal loading of `tag_dir` (every parameter of this engine must be in it); returns the
    client state. The switch is on for this load only: left on, DeepSpeed would read this run's own later
    checkpoints as universal ones too."""
    engine._config.load_universal_checkpoint = True
    try:
        _, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    finally:
        engine._config.load_universal_checkpoint = False
    return client


class RunLock:
    """One run per checkpoint directory: rank 0 holds an exclusive `flock` on `megaqkv_run.lock`, which records
    who holds it (host, PID, start time, command). The kernel drops the lock when the holder dies however it
    dies, so a lock file left by a killed run is recognised as stale (and taken over with a warning) even when
    its PID has been reused; a live holder stops the second run with a message naming it. Where the file
    system has no locks, a holder of this host whose PID is gone counts as stale."""

    def __init__(self, directory: Path, say=print):
        self.path = directory / LOCK
        self.fd = None
        try:
            self._take(directory, say)
        except OSError as exc:
            raise CheckpointError(f"{directory}: cannot use it as the checkpoint directory ({exc.strerror}); choose "
                                  "a --save directory this job can write") from None

    def _take(self, directory: Path, say) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held_by_other = False
            except BlockingIOError:
                held_by_other = True
            except OSError:  # no locking on this file system: judge by the recorded PID
                held_by_other = not self._stale(self._holder())
            if held_by_other:
                holder = self._holder()
                os.close(fd)
                raise CheckpointError(
                    f"{directory}: another run is using this checkpoint directory (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}: {holder.get('command', '?')}); wait "
                    f"for it, or use another --save directory. If no run uses it any more, delete {self.path}")
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:  # released and removed while we opened it
                os.close(fd)
                continue
            holder = self._holder()
            if holder:
                say(f"warning: {self.path} was left by pid {holder.get('pid')} on {holder.get('host')}, which is no "
                    "longer running; taking it over")
            me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            self.fd = fd
            return
        raise CheckpointError(f"{self.path}: another process keeps re-creating this lock; make sure no other run "
                              "uses the directory")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return not holder
        if holder["pid"] == os.getpid():
            return True
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def layout_of(grid) -> dict:
    return {"tp": grid.tp_size, "pp": grid.pp_size, "dp": grid.dp_size, "sp": grid.sp_size}


def stage_split_mismatch(tag_dir: Path, engine, grid) -> str | None:
    """How this rank's pipeline stage differs from the stage that wrote its part of a checkpoint of the same
    layout, or None. DeepSpeed keeps each stage's optimizer state as flat buffers of that stage's parameters, so
    another split of the layers (megaqkv's stages are balanced by compute, and every stage now holds a block) fails
    deep inside DeepSpeed's loader; the parameter names DeepSpeed records per model rank say it first."""
    path = tag_dir / f"mp_rank_{grid.mpu.get_model_parallel_rank():02d}_model_states.pt"
    saved = {name for group in layout.safe_load(path).get("param_shapes") or [] for name in group}
    mine = {name for name, prm in engine.module.named_parameters() if prm.requires_grad}
    here = None if not saved or saved == mine else (f"stage {grid.pp_rank} held layers {_layers(saved)} there and "
                                                     f"holds {_layers(mine)} here")
    return next((m for m in (gather(here) if dist.is_initialized() else [here]) if m), None)


def _layers(names) -> list[int]:
    """Layer indices of pipeline parameter names ("3.attn.in_proj.weight" -> 3; tied modules have none)."""
    return sorted({int(n.split(".")[0]) for n in names if n[0].isdigit()})


def same_layout(recorded: dict, grid) -> bool:
    """Whether a checkpoint's recorded layout is this grid's; checkpoints from before sequence parallelism
    record no "sp" (they ran at 1)."""
    return {"sp": 1, **recorded} == layout_of(grid)


def client_state(cfg, grid, step: int, consumed: int, universal_info: dict, valid: dict | None = None) -> dict:
    """What our checkpoints add to DeepSpeed's: position, RNG, the resolved config (plain data), layout, and the
    newest validation result ({step, loss, tokens}) for the model card of an export.

    DeepSpeed writes the client state from data rank 0 of each model rank only; the SP ranks, which DeepSpeed
    counts as data ranks, draw dropout from streams of their own, so every SP rank's RNG goes in as `rng_sp`."""
    rng = rng_state(grid.tp.rng)
    state = {"iteration": step, "consumed_samples": consumed, "rng": rng, "config": cfg.to_dict(),
             "layout": layout_of(grid), "universal_checkpoint_info": universal_info, "valid": valid,
             "sample_order": INDEX_VERSION}
    if grid.sp_size > 1:
        state["rng_sp"] = [None] * grid.sp_size
        dist.all_gather_object(state["rng_sp"], rng, group=grid.sp.group)
    return state


def resumed_rng(client: dict, grid) -> dict:
    """This rank's RNG streams from a checkpoint's client state (its SP rank's, see `client_state`)."""
    return client["rng_sp"][grid.sp_rank] if "rng_sp" in client else client["rng"]


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
