"""GPT training samples from indexed datasets: Megatron GPT-dataset semantics, cached indices, blending.

Packed mode: documents of a split, repeated for as many epochs as the requested samples need and
shuffled (document index), are cut into samples of `seq_length + 1` tokens where consecutive
samples share one token (sample index), and the samples are shuffled (shuffle index). When the
last epoch is used for less than 80% its documents and samples are shuffled on their own, so
that earlier epochs stay whole (Megatron's rule). Document mode reproduces the paper's
one-document-per-sample sampling: each sample is one document cut or padded to
`seq_length + 1`, with the padding masked out of the loss.

The three index arrays are built once (vectorised numpy: seconds for 10B tokens), saved as
`.npy` next to the data under a name hashed from everything they depend on (including the
document sizes, so changed data never reuses them), and memory-mapped by every rank; global
rank 0 builds while the others wait, and an unreadable or inconsistent cache is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .indexed import DataError, IndexedDataset

INDEX_VERSION = 1
SEPARATE_LAST_EPOCH_BELOW = 0.8


def split_ranges(num_docs: int, ratios: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges in proportion to `ratios` (e.g. 969, 30, 1), covering all documents."""
    if not ratios or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be non-negative with a positive sum, got {list(ratios)}")
    total = float(sum(ratios))
    bounds = [0] + [round(num_docs * sum(ratios[:i + 1]) / total) for i in range(len(ratios))]
    bounds[-1] = num_docs
    return [(bounds[i], bounds[i + 1]) for i in range(len(ratios))]


@dataclass(frozen=True)
class SampleConfig:
    seq_length: int
    num_samples: int
    seed: int
    mode: str = "packed"  # packed | document
    doc_start: int = 0
    doc_stop: int = -1  # -1: to the end


def _data_fingerprint(ds: IndexedDataset) -> str:
    return hashlib.md5(ds.sizes.tobytes()).hexdigest()


def packed_indices(sizes: np.ndarray, seq_length: int, num_samples: int, seed: int):
    """(doc_idx, sample_idx, shuffle_idx) for `num_samples` packed samples from documents of `sizes`."""
    docs = len(sizes)
    per_epoch = int(sizes.sum(dtype=np.int64))
    if per_epoch < 2 or docs == 0:
        raise DataError(f"cannot build samples from {docs} documents with {per_epoch} tokens")
    epochs = max(1, math.ceil((num_samples * seq_length + 1) / per_epoch))
    separate = False
    if epochs > 1:
        from_earlier = ((epochs - 1) * per_epoch - 1) // seq_length
        separate = (num_samples - from_earlier) < SEPARATE_LAST_EPOCH_BELOW * ((per_epoch - 1) // seq_length)
    rng = np.random.RandomState(seed)
    whole = epochs - 1 if separate else epochs
    doc_idx = np.tile(np.arange(docs, dtype=np.int64), whole)
    rng.shuffle(doc_idx)
    if separate:
        last = np.arange(docs, dtype=np.int64)
        rng.shuffle(last)
        doc_idx = np.concatenate([doc_idx, last])
    lengths = sizes[doc_idx].astype(np.int64)
    ends = np.cumsum(lengths)
    total = (epochs * per_epoch - 1) // seq_length
    starts = np.arange(total + 1, dtype=np.int64) * seq_length
    where = np.searchsorted(ends, starts, side="right")
    sample_idx = np.stack([where, starts - (ends[where] - lengths[where])], axis=1)
    if separate:
        first = ((epochs - 1) * per_epoch - 1) // seq_length
        shuffle_idx = np.concatenate([rng.permutation(first), first + rng.permutation(total - first)])
    else:
        shuffle_idx = rng.permutation(total)
    return doc_idx, sample_idx, shuffle_idx.astype(np.int64)


def document_indices(num_docs: int, num_samples: int, seed: int) -> np.ndarray:
    """One document per sample: every document once per epoch, each epoch in its own shuffled order."""
    rng = np.random.RandomState(seed)
    epochs = max(1, math.ceil(num_samples / num_docs))
    return np.concatenate([rng.permutation(num_docs) for _ in range(epochs)]).astype(np.int64)


def _is_rank0_or_single() -> tuple[bool, bool]:
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    return (not distributed or dist.get_rank() == 0), distributed


class GPTDataset:
    """`ds[i]` -> {"tokens": int64[seq_length + 1], "loss_mask": float32[seq_length]} (labels are tokens[1:])."""

    def __init__(self, indexed: IndexedDataset, cfg: SampleConfig, cache_dir: str | Path | None = None,
                 name: str = "train"):
        if cfg.mode not in ("packed", "document"):
            raise ValueError(f"sample mode must be 'packed' or 'document', got {cfg.mode!r}")
        self.indexed, self.cfg, self.name = indexed, cfg, name
        stop = len(indexed) if cfg.doc_stop < 0 else cfg.doc_stop
        if not 0 <= cfg.doc_start < stop <= len(indexed):
            raise DataError(f"{indexed.idx_path}: the {name} split holds no documents (range {cfg.doc_start}:{stop} "
                            f"of {len(indexed)}); give it a larger share in the split ratios or more data")
        self.doc_range = (cfg.doc_start, stop)
        description = {"version": INDEX_VERSION, "class": "GPTDataset", **asdict(cfg), "doc_stop": stop,
                       "data": _data_fingerprint(indexed), "sequences": len(indexed)}
        key = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()
        cache = Path(cache_dir) if cache_dir else indexed.cache_dir
        self.cache_prefix = cache / f"{key}-{name}-{cfg.mode}"
        self.arrays = self._load_or_build(description)
        if cfg.mode == "packed":
            self.doc_idx, self.sample_idx, self.shuffle_idx = self.arrays
            self.length = len(self.shuffle_idx)
        else:
            (self.doc_idx,) = self.arrays
            self.length = len(self.doc_idx)
        if self.length < cfg.num_samples:
            raise DataError(f"{self.cache_prefix}: index holds {self.length} samples, {cfg.num_samples} requested")

    @property
    def epochs(self) -> int:
        """Passes over the split's documents that the samples take (above 1, samples reuse the same tokens)."""
        return len(self.doc_idx) // (self.doc_range[1] - self.doc_range[0])

    # -------------------------------------------------------------- index cache

    def _names(self) -> list[str]:
        return ["doc_idx", "sample_idx", "shuffle_idx"] if self.cfg.mode == "packed" else ["doc_idx"]

    def _build(self) -> list[np.ndarray]:
        start, stop = self.doc_range
        if self.cfg.mode == "document":
            return [start + document_indices(stop - start, self.cfg.num_samples, self.cfg.seed)]
        doc_idx, sample_idx, shuffle_idx = packed_indices(self.indexed.sizes[start:stop], self.cfg.seq_length,
                                                          self.cfg.num_samples, self.cfg.seed)
        return [start + doc_idx, sample_idx, shuffle_idx]

    def _load(self) -> list[np.ndarray] | None:
        try:
            arrays = [np.load(f"{self.cache_prefix}-{n}.npy", mmap_mode="r", allow_pickle=False) for n in self._names()]
        except (OSError, ValueError):
            return None
        start, stop = self.doc_range
        doc_idx = arrays[0]
        ok = doc_idx.ndim == 1 and len(doc_idx) > 0 and doc_idx.min() >= start and doc_idx.max() < stop
        if ok and self.cfg.mode == "packed":
            sample_idx, shuffle_idx = arrays[1], arrays[2]
            ok = (sample_idx.ndim == 2 and sample_idx.shape[1] == 2 and len(shuffle_idx) == len(sample_idx) - 1
                  and sample_idx[:, 0].max() < len(doc_idx) and shuffle_idx.min() >= 0
                  and shuffle_idx.max() < len(shuffle_idx))
        return arrays if ok else None

    def _save(self, arrays: list[np.ndarray]) -> None:
        self.cache_prefix.parent.mkdir(parents=True, exist_ok=True)
        for n, a in zip(self._names(), arrays):
            tmp = f"{self.cache_prefix}-{n}.tmp.npy"
            np.save(tmp, a, allow_pickle=False)
            os.replace(tmp, f"{self.cache_prefix}-{n}.npy")

    def _load_or_build(self, description: dict) -> list[np.ndarray]:
        builder, distributed = _is_rank0_or_single()
        if builder and self._load() is None:
            self._save(self._build())
            Path(f"{self.cache_prefix}-description.json").write_text(json.dumps(description, indent=1))
        if distributed:
            import torch.distributed as dist

            dist.barrier()
        arrays = self._load()
        if arrays is None:
            raise DataError(f"{self.cache_prefix}-*.npy: sample index unreadable after building; is the cache "
                            "directory shared by all ranks and writable?")
        return arrays

    # -------------------------------------------------------------- samples

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        L = self.cfg.seq_length
        if self.cfg.mode == "document":
            doc = self.indexed.get(int(self.doc_idx[i]))[:L + 1]
            tokens = np.zeros(L + 1, dtype=np.int64)
            tokens[:len(doc)] = doc
            mask = np.zeros(L, dtype=np.float32)
            mask[:len(doc) - 1] = 1.0  # a label exists only where the next token is the document's own
            return {"tokens": tokens, "loss_mask": mask}
        j = int(self.shuffle_idx[i])
        (d0, o0), (d1, o1) = self.sample_idx[j], self.sample_idx[j + 1]
        if d0 == d1:
            tokens = self.indexed.get(int(self.doc_idx[d0]), int(o0), int(o1 - o0 + 1))
        else:
            parts = [self.indexed.get(int(self.doc_idx[d0]), int(o0))]
            parts += [self.indexed.get(int(self.doc_idx[d])) for d in range(d0 + 1, d1)]
            parts.append(self.indexed.get(int(self.doc_idx[d1]), 0, int(o1 + 1)))
            tokens = np.concatenate(parts)
        return {"tokens": tokens.astype(np.int64), "loss_mask": np.ones(L, dtype=np.float32)}


def blend_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, sample index within it) for `size` samples drawn in proportion to `weights`.

    Dataset i's k-th sample is due at time (k + 0.5) / w_i; merging all due times gives every prefix
    of the order the target proportions to within one sample per dataset, deterministically.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    counts = [math.ceil(wi * size) + 1 if wi > 0 else 0 for wi in w]
    due = np.concatenate([(np.arange(c) + 0.5) / wi for c, wi in zip(counts, w) if c])
    which = np.concatenate([np.full(c, i, dtype=np.int64) for i, c in enumerate(counts) if c])
    rank = np.concatenate([np.arange(c, dtype=np.int64) for c in counts if c])
    order = np.argsort(due, kind="stable")[:size]
    return which[order], rank[order]


class BlendedDataset:
    """Several datasets mixed by weight; `ds[i]` draws from dataset_index[i] at its own sample index."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        self.datasets = list(datasets)
        self.dataset_index, self.sample_index = blend_indices(weights, size)
        for i, ds in enumerate(self.datasets):
            need = int(self.sample_index[self.dataset_index == i].max(initial=-1)) + 1
            if need > len(ds):
                raise DataError(f"blend: dataset {i} has {len(ds)} samples, {need} are needed for {size} blended "
                                "samples at its weight")
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]


def blend_sample_counts(weights: Sequence[float], size: int) -> list[int]:
    """Samples each dataset must provide so that a blend of `size` never runs out (with 0.5% headroom)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return [math.ceil(wi * size * 1.005) + 2 if wi > 0 else 0 for wi in w]


def micro_batch_indices(consumed_samples: int, micro_batch_size: int, dp_size: int, dp_rank: int,
                        total: int):
    """Sample indices of each micro-batch this DP rank reads, from `consumed_samples` on.

    The global order is 0, 1, 2, ... (the shuffle lives in the dataset), so the position in the run
    is fully described by the number of samples consumed: resuming at that count reads exactly the
    samples an uninterrupted run would have read next.
    """
    step = micro_batch_size * dp_size
    for start in range(consumed_samples, total - step + 1, step):
        first = start + dp_rank * micro_batch_size
        yield list(range(first, first + micro_batch_size))
