"""Weighted mixing of several sample datasets, identical to megatron-core's `BlendedDataset`.

Megatron's rule is a greedy: sample t goes to the dataset furthest behind its share, the first maximum of
`weight_i × max(t, 1) − taken_i` in double precision, and is that dataset's next unused sample. Megatron runs it
sample by sample in C++. Here it runs in numpy, exactly (the same double products and differences, the same first
maximum), without a compiled helper: the run is cut into blocks of BLOCK samples which are all simulated at once,
each from a guess of the counts at its start (the shares rounded). The greedy forgets a wrong start within a few
steps, so a block whose guess was wrong is run again from the true end of the block before it, only until its
counts meet those of its first run (from equal counts at the same step the picks are the same), and this repeats
until every block starts where the one before it ended. The result is exactly the sequential greedy's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .index_cache import cache_prefix, load_or_build
from .indexed import DataError

BLOCK = 256  # samples per block: long enough for a wrong start to be forgotten, short enough for wide numpy steps
MAX_DATASETS = 32767  # the dataset index is int16, as Megatron's


def normalize(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum in float64, as Megatron normalises (so every bit matches)."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def _first_guess(w: np.ndarray, t0: np.ndarray) -> np.ndarray:
    """Counts (datasets × blocks) after t0 samples: each share rounded down, the remainders rounded up by size."""
    exact = w[:, None] * t0[None, :].astype(np.float64)
    counts = np.floor(exact)
    missing = t0 - counts.sum(axis=0).astype(np.int64)
    rank = np.argsort(np.argsort(counts - exact, axis=0, kind="stable"), axis=0, kind="stable")
    return counts + (rank < missing[None, :])


def _simulate(w: np.ndarray, t0: np.ndarray, counts: np.ndarray, picks: np.ndarray, taken: np.ndarray,
              columns: np.ndarray | None = None, earlier: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run the greedy for picks.shape[0] steps from sample t0[k] and `counts[:, k]` for every k at once, writing the
    choice at step s into picks[s, columns[k]] and the chosen dataset's count before it into taken[s, columns[k]].

    Without `columns`, all columns run. With `earlier` (the counts these columns started from when they last ran), a
    run stops as soon as its counts equal that earlier run's at the same step, keeping the rest of the earlier run.
    Returns the columns that ran to the end and their counts there.
    """
    counts = np.array(counts, dtype=np.float64, order="C")
    diff = None if earlier is None else counts - earlier
    live = np.arange(picks.shape[1]) if columns is None else np.asarray(columns)
    at = slice(None) if columns is None else live
    t = t0.astype(np.float64)
    lane = np.arange(len(live))
    for s in range(picks.shape[0]):
        here = np.maximum(t, 1.0) if s < 2 else t  # Megatron's max(t, 1): samples 0 and 1 share t = 1
        best = w[0] * here - counts[0]
        choice = np.zeros(len(live), dtype=np.intp)
        for j in range(1, len(w)):
            error = w[j] * here - counts[j]
            ahead = error > best
            np.copyto(best, error, where=ahead)
            choice[ahead] = j
        slot = choice * len(live) + lane
        flat = counts.reshape(-1)
        if diff is not None:
            before = picks[s, at].astype(np.intp) * len(live) + lane
        picks[s, at] = choice
        taken[s, at] = flat[slot]
        flat[slot] += 1
        t += 1.0
        if diff is None:
            continue
        diff.reshape(-1)[slot] += 1
        diff.reshape(-1)[before] -= 1
        running = diff.any(axis=0)
        if not running.all():
            live, counts, diff, t = live[running], counts[:, running].copy(), diff[:, running].copy(), t[running]
            at, lane = live, np.arange(len(live))
            if not len(live):
                break
    return live, counts


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index int16, sample index within that dataset int64) of `size` blended samples: megatron-core's
    `build_blending_indices` for these (normalised) weights."""
    w = np.asarray(weights, dtype=np.float64)
    if not 0 < len(w) <= MAX_DATASETS:
        raise ValueError(f"a blend takes 1 to {MAX_DATASETS} datasets, got {len(w)}")
    blocks = -(-size // BLOCK)
    t0 = np.arange(blocks, dtype=np.int64) * BLOCK
    start = _first_guess(w, t0)
    picks = np.empty((BLOCK, blocks), dtype=np.int16)
    taken = np.empty((BLOCK, blocks), dtype=np.int64)
    end = np.empty_like(start)
    ran, counts = _simulate(w, t0, start, picks, taken)
    end[:, ran] = counts
    while True:
        stale = np.nonzero((start[:, 1:] != end[:, :-1]).any(axis=0))[0] + 1
        if not len(stale):
            break
        earlier = start[:, stale]
        start[:, stale] = end[:, stale - 1]
        ran, counts = _simulate(w, t0[stale], start[:, stale], picks, taken, stale, earlier)
        end[:, ran] = counts
    return picks.T.reshape(-1)[:size], taken.T.reshape(-1)[:size]


class BlendedDataset:
    """Several datasets mixed by weight: `ds[i]` is sample dataset_sample_index[i] of dataset dataset_index[i].
    The two index arrays are cached like a GPTDataset's (keyed by the datasets' own descriptions)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, cache_dir: str | Path | None = None,
                 name: str = "train"):
        self.datasets, self.size = list(datasets), size
        if len(self.datasets) != len(weights) or any(not w > 0 for w in weights):
            raise ValueError(f"a blend needs one positive weight per dataset, got {list(weights)} for "
                             f"{len(self.datasets)} datasets")
        self.weights = normalize(weights)
        self.description = {"class": "BlendedDataset", "datasets": [d.description for d in self.datasets],
                            "weights": self.weights, "size": size}
        self.cache_prefix = cache_prefix(cache_dir or self.datasets[0].indexed.cache_dir, self.description,
                                         f"{name}-blend")
        self.dataset_index, self.dataset_sample_index = load_or_build(
            self.cache_prefix, ["dataset_index", "dataset_sample_index"],
            lambda: blending_indices(self.weights, size), self._consistent, self.description)
        taken = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for i, (ds, n) in enumerate(zip(self.datasets, taken)):
            if n > len(ds):
                raise DataError(f"{ds.indexed.idx_path}: the blend takes {n:,} samples from it (dataset {i}), but it "
                                f"holds {len(ds):,}; Megatron would refuse this blend too (raise its weight or give "
                                "it more data)")

    def _consistent(self, arrays: list[np.ndarray]) -> bool:
        index, sample = arrays
        return (index.shape == (self.size,) and sample.shape == (self.size,) and index.dtype == np.int16
                and (self.size == 0 or (index.min() >= 0 and index.max() < len(self.datasets) and sample.min() >= 0)))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
