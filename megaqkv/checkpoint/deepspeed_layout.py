"""The layout of our DeepSpeed training checkpoints, and what makes them trustworthy.

DeepSpeed writes `<dir>/global_stepN/` from every rank. Once every rank has finished, a completion
marker (`megaqkv_complete.json`) is written into it holding the size and SHA-256 of every file, the
step and the loss of that step; only then is `latest` pointed at it. A directory without the marker
is never resumed from. Before a checkpoint is used, its files are checked against the marker (a
bit flip or a truncated file is caught, not resumed into NaNs) and every `.pt` must load with
`torch.load(weights_only=True)` allowing only DeepSpeed's own plain classes, so a planted pickle is
refused, never executed. A checkpoint that fails is moved aside (`global_stepN.damaged`), not
deleted, and the newest one that verifies is used instead. Pruning never removes the newest
checkpoint that verified with a finite loss. `mp_rank_00_model_states.pt` holds our client state (config,
layout, data position); next to the checkpoints sits our `zero_to_fp32.py` in place of DeepSpeed's.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, ModelConfig, model_config_from_dict
from .consolidated import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """A file that would need arbitrary Python objects unpickled: refused outright, never fallen back from."""

MARKER = "megaqkv_complete.json"
RECOVERY_SCRIPT = "zero_to_fp32.py"
TAG = re.compile(r"^global_step(\d+)$")
DAMAGED = ".damaged"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int:
    return int(TAG.match(tag).group(1))


def complete_tags(directory: str | Path) -> list[str]:
    """Tags with a completion marker, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if TAG.match(p.name) and (p / MARKER).is_file()), key=step_of)


def read_marker(tag_dir: Path) -> dict:
    try:
        marker = json.loads((tag_dir / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{tag_dir / MARKER}: unreadable completion marker ({exc})") from None
    if not isinstance(marker, dict):
        raise CheckpointError(f"{tag_dir / MARKER}: not a completion marker")
    return marker


def checkpoint_files(tag_dir: Path) -> list[str]:
    """Every file of a checkpoint (relative names), the marker excepted, in a fixed order."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER)


def digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def write_marker(tag_dir: Path, step: int, files: dict[str, dict], loss: float | None, **info) -> None:
    marker = {"step": step, "time": time.time(), "loss": loss,
              "loss_finite": loss is not None and math.isfinite(loss), **info, "files": files}
    tmp = tag_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, tag_dir / MARKER)


def point_latest(directory: Path, tag: str) -> None:
    tmp = directory / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, directory / "latest")


def _allowed_classes() -> list:
    """DeepSpeed's plain classes that its own optimizer files pickle; nothing else is unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location="cpu", mmap: bool = False):
    """`torch.load(weights_only=True)` allowing DeepSpeed's own plain classes; a file that needs anything else,
    or that is not a readable torch file, is a CheckpointError naming it."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        allowed = {f"{c.__module__}.{c.__qualname__}" for c in _allowed_classes()}
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        except Exception:  # noqa: BLE001 - a stream too damaged to list is reported as corrupt below
            unsafe = []
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused: it needs Python objects unpickled that a DeepSpeed checkpoint never holds "
                f"({', '.join(unsafe)}); megaqkv loads checkpoint files with weights_only=True only. Do not use "
                "this checkpoint unless you know who wrote it") from None
        error = exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        error = exc
    raise CheckpointError(f"{path}: truncated or corrupt ({str(error).splitlines()[0].split('. ')[0][:200]})")


def verify(tag_dir: Path, share: tuple[int, int] = (0, 1)) -> list[tuple[str, str]]:
    """Problems of one checkpoint as (kind, message), kind 'unsafe' or 'damaged' (empty: usable). Every file on
    disk is checked, not only the recorded ones: DeepSpeed's tools find files by name pattern, so a file added
    later would be read too. `share` = (rank, world) checks every world-th file, so that the ranks of a job
    verify a large checkpoint together."""
    try:
        marker = read_marker(tag_dir)
    except CheckpointError as exc:
        return [("damaged", str(exc))]
    recorded = marker.get("files") if isinstance(marker.get("files"), dict) else None
    names = sorted(set(recorded or {}) | set(checkpoint_files(tag_dir)))
    problems = []
    rank, world = share
    for name in names[rank::world]:
        path = tag_dir / name
        if not path.is_file():
            problems.append(("damaged", f"{path}: missing"))
            continue
        if path.suffix == ".pt":  # first: a planted pickle must be named as such, whatever its size
            try:
                safe_load(path, mmap=True)
            except UnsafeCheckpointError as exc:
                problems.append(("unsafe", str(exc)))
                continue
            except CheckpointError as exc:
                problems.append(("damaged", str(exc)))
                continue
        if recorded is None:
            continue  # a marker from before checksums were recorded: the safe load is all we can check
        want = recorded.get(name)
        if want is None:
            problems.append(("damaged", f"{path}: not part of the checkpoint when it was saved"))
        elif path.stat().st_size != want.get("bytes"):
            problems.append(("damaged", f"{path}: {path.stat().st_size:,} bytes, {want.get('bytes'):,} when it was "
                                        "saved (truncated?)"))
        elif digest(path)["sha256"] != want.get("sha256"):
            problems.append(("damaged", f"{path}: checksum differs from the one recorded when it was saved "
                                        "(corrupted)"))
    return problems


def quarantine(tag_dir: Path) -> Path:
    """Move a damaged checkpoint out of the way (kept for inspection, never resumed from or pruned)."""
    target = tag_dir.with_name(tag_dir.name + DAMAGED)
    n = 1
    while target.exists():
        n += 1
        target = tag_dir.with_name(f"{tag_dir.name}{DAMAGED}{n}")
    os.replace(tag_dir, target)
    return target


def describe(problems: list[tuple[str, str]]) -> str:
    return "; ".join(m for _, m in problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")


def choose(directory: Path, problems_of: Callable[[Path], list[tuple[str, str]]], say=print,
           move_aside: bool = True) -> str | None:
    """The best checkpoint that verifies; damaged ones are reported (naming the file) and moved aside, an unsafe
    one stops everything. `problems_of` lets a job verify collectively (every rank a share, results gathered)."""
    latest = directory / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    newest_first = complete_tags(directory)[::-1]  # tried after the one `latest` names
    tags = ([named] if named in newest_first else []) + [t for t in newest_first if t != named]
    if named and named not in tags:
        say(f"warning: {latest} names '{named}', which is incomplete (the run stopped while saving it)"
            + ("; trying the newest complete checkpoint" if tags else ""))
    elif tags and named is None:
        say(f"warning: {latest} is missing; trying the newest complete checkpoint")
    for tag in tags:
        problems = problems_of(directory / tag)
        if not problems:
            if move_aside and tag != named:
                point_latest(directory, tag)  # `latest` must not keep naming a checkpoint that was moved aside
            return tag
        unsafe = [p for p in problems if p[0] == "unsafe"]
        if unsafe:
            raise UnsafeCheckpointError(describe(unsafe))
        say(f"warning: checkpoint {directory / tag} is damaged: {describe(problems)}")
        if move_aside:
            say(f"warning: moved it to {quarantine(directory / tag)}; trying the next older checkpoint")
    return None


def _finite(tag_dir: Path) -> bool:
    """Whether the step's loss was finite (markers from before losses were recorded count as finite; an
    unreadable marker does not)."""
    try:
        return bool(read_marker(tag_dir).get("loss_finite", True))
    except CheckpointError:
        return False


def finite_tags(directory: Path) -> list[str]:
    return [t for t in complete_tags(directory) if _finite(directory / t)]


def leftovers(directory: Path) -> list[str]:
    """What shows that checkpoints were written here before, when none is complete any more."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name == "latest" or DAMAGED in p.name)


def prune(directory: Path, keep_last: int, keep: str | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints, `keep` (the one just written) and the newest one whose
    loss was finite; drop older ones and incomplete leftovers (called right after a checkpoint is complete,
    when no other one can be in the middle of being written)."""
    tags = complete_tags(directory)
    finite = finite_tags(directory)
    protected = {keep, *(finite[-1:]), *(tags[-keep_last:] if keep_last else tags)}
    doomed = [t for t in tags if t not in protected]
    doomed += [p.name for p in directory.iterdir() if TAG.match(p.name) and not (p / MARKER).is_file()
               and p.name != keep]
    for tag in doomed:
        shutil.rmtree(directory / tag, ignore_errors=True)


def client_state_of(tag_dir: Path) -> dict:
    """What our pretrain.py stored next to DeepSpeed's state (config, layout, position), read safely."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    state = safe_load(path)
    if not isinstance(state, dict) or "config" not in state or "layout" not in state:
        raise CheckpointError(f"{path}: not written by megaqkv's pretrain.py (no config/layout in its client state)")
    return state


def model_config_of(tag_dir: Path, client: dict) -> ModelConfig:
    try:
        return model_config_from_dict(client["config"]["model"], source=f"{tag_dir}/mp_rank_00_model_states.pt")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def trainer_state(client: dict) -> dict:
    """The training position and settings a conversion carries along (a consolidated trainer_state.json)."""
    training = client["config"].get("training", {})
    return {"step": client.get("global_steps", client.get("iteration", 0)),
            "consumed_samples": client.get("consumed_samples", 0),
            "skipped_steps": client.get("skipped_steps", 0),
            "precision": training.get("precision"),
            "seq_length": training.get("seq_length"),
            "tokenizer": client["config"].get("data", {}).get("tokenizer"),
            "valid": client.get("valid")}


def install_recovery_script(directory: Path) -> None:
    """Put our zero_to_fp32.py where DeepSpeed's save copied its own, which cannot read our checkpoints
    (checkpoint/zero_to_fp32.py says why); same name and command line, executable like DeepSpeed's."""
    source = Path(__file__).with_name(RECOVERY_SCRIPT)
    tmp = directory / (RECOVERY_SCRIPT + ".tmp")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, directory / RECOVERY_SCRIPT)
