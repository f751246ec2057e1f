"""Weighted mixing of several sample datasets, identical to megatron-core's `BlendedDataset`.

Megatron's rule is a greedy: sample t goes to the dataset furthest behind its share, the first maximum of
`weight_i × max(t, 1) − taken_i` in double precision, and is that dataset's next unused sample. Megatron runs it
sample by sample in C++; here it runs in numpy with the same double products, differences and first maximum, so the
result is bit for bit the same, without a compiled helper:

1. The run is cut into blocks of BLOCK samples, all simulated at once (one numpy step advances every block), each
   from a guess of the counts at its start (the shares, rounded).
2. The greedy soon forgets a wrong start, so a block whose start differs from the end of the block before it is run
   again from that end, all such blocks at once, each only until its counts meet those of its first run (from equal
   counts at the same step the picks are the same). This repeats while many blocks are left.
3. The few left (a rarely chosen dataset whose count was guessed wrong stays wrong for many blocks) are finished in
   order in plain Python, one sample at a time while the counts differ and skipping ahead once they meet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .index_cache import cache_prefix, load_or_build
from .indexed import DataError

BLOCK = 256  # samples per block: long enough for a wrong start to be forgotten, short enough for wide numpy steps
WALK_BELOW = 64  # stale blocks left at which the rest is done in order, in plain Python (faster for so few)
MAX_DATASETS = 32767  # the dataset index is int16, as Megatron's


def normalize(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum in float64, as Megatron normalises (so every bit matches)."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def _guess(w: np.ndarray, t0: np.ndarray) -> np.ndarray:
    """Counts (blocks × datasets) after t0 samples: each share rounded down, the ones left over given to the largest
    remainders."""
    exact = t0[:, None].astype(np.float64) * w[None, :]
    counts = np.floor(exact)
    missing = t0 - counts.sum(axis=1).astype(np.int64)
    plus = np.zeros(counts.shape, dtype=bool)
    np.put_along_axis(plus, np.argsort(counts - exact, axis=1), np.arange(len(w))[None, :] < missing[:, None], axis=1)
    return counts + plus


def _first_max(w: np.ndarray, here: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row of `counts` (blocks × datasets), the dataset of the first maximum of w × here − counts: Megatron's
    scan, which takes a later dataset only when its value is strictly larger (numpy's first argmax; for a few
    datasets, a loop over them is faster)."""
    if counts.shape[1] > 4:
        error = np.multiply(here[:, None], w[None, :])
        return np.subtract(error, counts, out=error).argmax(axis=1)
    best = w[0] * here - counts[:, 0]
    choice = np.zeros(len(counts), dtype=np.intp)
    for j in range(1, counts.shape[1]):
        error = w[j] * here - counts[:, j]
        ahead = error > best
        np.copyto(best, error, where=ahead)
        choice[ahead] = j
    return choice


def _simulate(w: np.ndarray, t0: np.ndarray, counts: np.ndarray, picks: np.ndarray, taken: np.ndarray,
              blocks: np.ndarray | None = None, earlier: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run the greedy for picks.shape[0] steps from sample t0[k] and counts[k] for every k at once, writing the pick
    at step s into picks[s, blocks[k]] and the picked dataset's count before it into taken[s, blocks[k]].

    Without `blocks`, all blocks run. With `earlier` (the counts these blocks started from when they last ran), a run
    stops once its counts equal that earlier run's at the same step, keeping the rest of the earlier run. Returns the
    blocks that ran to the end and their counts there.
    """
    counts = np.array(counts, dtype=np.float64, order="C")
    diff = None if earlier is None else counts - earlier
    apart = None if diff is None else (diff != 0).sum(axis=1)  # datasets whose counts differ, per block
    live = np.arange(picks.shape[1]) if blocks is None else np.asarray(blocks)
    at = slice(None) if blocks is None else live
    t = t0.astype(np.float64)
    lane = np.arange(len(live))
    for s in range(picks.shape[0]):
        pick = _first_max(w, np.maximum(t, 1.0) if s < 2 else t, counts)  # Megatron's max(t, 1)
        if diff is not None:
            before = picks[s, at].astype(np.intp)
        picks[s, at] = pick
        slot = lane * counts.shape[1] + pick  # (lane, pick) in the flat matrix: faster than 2-d indexing
        taken[s, at] = counts.reshape(-1)[slot]
        counts.reshape(-1)[slot] += 1
        t += 1.0
        if diff is None:
            continue
        for j, step in ((pick, 1), (before, -1)):
            was = diff[lane, j]
            apart += (was + step != 0).astype(np.intp) - (was != 0)
            diff[lane, j] = was + step
        met = apart == 0  # a block that met its earlier run would repeat it: dropped once a quarter have met
        if 4 * np.count_nonzero(met) >= len(live) > 0:
            running = ~met
            live, t, apart, counts, diff = live[running], t[running], apart[running], counts[running], diff[running]
            at, lane = live, np.arange(len(live))
            if not len(live):
                break
    return live, counts


def _walk(w: np.ndarray, t0: np.ndarray, start: np.ndarray, end: np.ndarray, picks: np.ndarray, taken: np.ndarray,
          first: int) -> None:
    """Make every block from `first` on start where the one before it ends, in order, one sample at a time while
    the true counts differ from a block's run and skipping the rest of the block once they meet."""
    rates = w.tolist()

    def choose(here: float, c) -> int:  # Megatron's scan; numpy's first argmax for many datasets
        if len(c) > 32:
            return int((w * here - np.asarray(c)).argmax())
        pick, best = 0, rates[0] * here - c[0]
        for j in range(1, len(c)):
            error = rates[j] * here - c[j]
            if error > best:
                pick, best = j, error
        return pick

    counts = end[first - 1].copy()
    for b in range(first, len(start)):
        if (counts == start[b]).all():
            counts = end[b].copy()
            continue
        diff = (counts - start[b]).tolist()
        apart = int((counts != start[b]).sum())
        c = counts.copy() if len(w) > 32 else counts.tolist()
        for s in range(picks.shape[0]):
            pick = choose(max(float(t0[b] + s), 1.0), c)
            before = int(picks[s, b])
            picks[s, b], taken[s, b] = pick, c[pick]
            c[pick] += 1
            for j, step in ((pick, 1), (before, -1)):
                apart += (diff[j] + step != 0) - (diff[j] != 0)
                diff[j] += step
            if not apart:  # the block's own run from here on is the true one
                break
        if apart:
            end[b] = c
        counts = end[b].copy()


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index int16, sample index within that dataset int64) of `size` blended samples: megatron-core's
    `build_blending_indices` for these (normalised) weights."""
    w = np.asarray(weights, dtype=np.float64)
    if not 0 < len(w) <= MAX_DATASETS:
        raise ValueError(f"a blend takes 1 to {MAX_DATASETS} datasets, got {len(w)}")
    t0 = np.arange(-(-size // BLOCK), dtype=np.int64) * BLOCK
    start = _guess(w, t0)
    picks = np.empty((BLOCK, len(t0)), dtype=np.int16)
    taken = np.empty((BLOCK, len(t0)), dtype=np.int64)
    end = np.empty_like(start)
    ran, counts = _simulate(w, t0, start, picks, taken)
    end[ran] = counts
    while True:
        stale = np.nonzero((start[1:] != end[:-1]).any(axis=1))[0] + 1
        if len(stale) <= WALK_BELOW:  # a few left (a difference that lasts, from a rarely chosen dataset): in order
            if len(stale):
                _walk(w, t0, start, end, picks, taken, int(stale[0]))
            break
        earlier = start[stale]
        start[stale] = end[stale - 1]
        ran, counts = _simulate(w, t0[stale], start[stale], picks, taken, stale, earlier)
        end[ran] = counts
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
                                f"holds {len(ds):,}; megatron-core refuses such a blend too (its 0.5% surplus is short "
                                "here): change the weights or the number of samples slightly")

    def _consistent(self, arrays: list[np.ndarray]) -> bool:
        index, sample = arrays
        return (index.shape == (self.size,) and sample.shape == (self.size,) and index.dtype == np.int16
                and (self.size == 0 or (index.min() >= 0 and index.max() < len(self.datasets) and sample.min() >= 0)))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
