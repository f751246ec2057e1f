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
        prune(directory, keep_last, keep=tag)
    dist.barrier()
    return directory / tag


def prune(directory: Path, keep_last: int, keep: str | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints (and `keep`, the one just written); drop older ones and
    any incomplete leftovers (called right after a checkpoint is complete, when no other one can be in the
    middle of being written)."""
    tags = complete_tags(directory)
    doomed = tags[:-keep_last] if keep_last else []
    doomed += [p.name for p in directory.iterdir() if TAG.match(p.name) and not (p / MARKER).is_file()]
    doomed = [t for t in doomed if t != keep]
    for tag in doomed:
        shutil.rmtree(directory / tag, ignore_errors=True)


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
