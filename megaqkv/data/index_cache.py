"""Index arrays cached as `.npy` files under a name hashed from everything they depend on.

Global rank 0 builds them while the other ranks wait, then every rank memory-maps them. A file that cannot be read or
fails its consistency check is rebuilt, so a damaged cache costs time, never wrong samples.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .indexed import DataError


def cache_prefix(cache_dir: str | Path, description: dict, name: str) -> Path:
    key = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"{key}-{name}"


def _is_rank0_or_single() -> tuple[bool, bool]:
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    return (not distributed or dist.get_rank() == 0), distributed


def _load(prefix: Path, names: Sequence[str], check: Callable[[list], bool]) -> list[np.ndarray] | None:
    try:
        arrays = [np.load(f"{prefix}-{n}.npy", mmap_mode="r", allow_pickle=False) for n in names]
    except (OSError, ValueError):
        return None
    return arrays if check(arrays) else None


def _save(prefix: Path, names: Sequence[str], arrays: Sequence[np.ndarray], description: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for n, a in zip(names, arrays):
        tmp = f"{prefix}-{n}.tmp.npy"
        np.save(tmp, a, allow_pickle=False)
        os.replace(tmp, f"{prefix}-{n}.npy")
    Path(f"{prefix}-description.json").write_text(json.dumps(description, indent=1))


def load_or_build(prefix: Path, names: Sequence[str], build: Callable[[], Sequence[np.ndarray]],
                  check: Callable[[list], bool], description: dict) -> list[np.ndarray]:
    """The arrays `names` at `prefix`, built by `build` on rank 0 when missing or failing `check`. Every rank of a
    distributed run must call this in the same order (a barrier)."""
    builder, distributed = _is_rank0_or_single()
    if builder and _load(prefix, names, check) is None:
        _save(prefix, names, build(), description)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    arrays = _load(prefix, names, check)
    if arrays is None:
        raise DataError(f"{prefix}-*.npy: sample index unreadable after building; is the cache directory shared by "
                        "all ranks and writable?")
    return arrays
