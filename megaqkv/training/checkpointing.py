"""Training checkpoints in DeepSpeed's layout, made crash-safe.

DeepSpeed writes `<dir>/global_stepN/` from every rank. Only after all ranks have finished
(a barrier) does rank 0 write a completion marker into it and then point `latest` at it
(atomically), so `latest` never names a half-written checkpoint, and a directory without the
marker is never resumed from. Older complete checkpoints beyond `keep_last` are pruned.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "megaqkv_complete.json"
TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def complete_tags(directory: str | Path) -> list[str]:
    """Tags with a completion marker, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir() if TAG.match(p.name) and (p / MARKER).is_file()]
    return sorted(tags, key=lambda t: int(TAG.match(t).group(1)))


def resume_tag(directory: str | Path) -> tuple[str | None, str | None]:
    """(tag to resume from, a warning if `latest` could not be used)."""
    d = Path(directory)
    latest = d / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    if named and (d / named / MARKER).is_file():
        return named, None
    tags = complete_tags(d)
    if not tags:
        return None, (f"{latest} names '{named}', which is incomplete, and no complete checkpoint exists"
                      if named else None)
    return tags[-1], (f"{latest} names '{named}', which is incomplete; resuming from {tags[-1]}, the newest "
                      "complete checkpoint" if named else f"{latest} is missing; resuming from {tags[-1]}")


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


def save(engine, directory: str | Path, step: int, client_state: dict, keep_last: int) -> Path:
    directory = Path(directory)
    tag = tag_for(step)
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        marker = directory / tag / MARKER
        marker.write_text(json.dumps({"step": step, "time": time.time(),
                                      "consumed_samples": client_state["consumed_samples"]}))
        tmp = directory / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, directory / "latest")
        prune(directory, keep_last)
    dist.barrier()
    return directory / tag


def prune(directory: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and any incomplete leftovers (called
    right after a checkpoint is complete, when no other one can be in the middle of being written)."""
    tags = complete_tags(directory)
    doomed = tags[:-keep_last] if keep_last else []
    doomed += [p.name for p in directory.iterdir() if TAG.match(p.name) and not (p / MARKER).is_file()]
    for tag in doomed:
        shutil.rmtree(directory / tag, ignore_errors=True)
