"""GPT samples of one indexed dataset, identical to megatron-core's `GPTDataset` (same seed, sizes, split).

Packed mode: documents of a split, repeated for as many epochs as the requested samples need and
shuffled (document index), are cut into samples of `seq_length + 1` tokens where consecutive
samples share one token (sample index), and the samples are shuffled (shuffle index). When the
last epoch would be used for fewer than int(0.8 × samples per epoch) samples, its documents and
samples are shuffled on their own, so that earlier epochs stay whole (Megatron's rule). Document
mode (ours, not Megatron's) reproduces the paper's one-document-per-sample sampling: each sample is
one document cut or padded to `seq_length + 1`, with the padding masked out of the loss.

The three index arrays are built once (vectorised numpy: seconds for 10B tokens) and cached as
`.npy` (index_cache.py) under a name hashed from everything they depend on, including the
document sizes, so changed data never reuses them.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .index_cache import cache_prefix, load_or_build
from .indexed import DataError, IndexedDataset

INDEX_VERSION = 2  # 2: Megatron's integer last-epoch threshold and split rounding (version 1 caches are not reused)
SEPARATE_LAST_EPOCH_BELOW = 0.8


def split_ranges(num_docs: int, ratios: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges in proportion to `ratios` (e.g. 969, 30, 1), rounded as megatron-core rounds its
    split matrix (normalised ratios, their running sums, each times the document count, rounded)."""
    if not ratios or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be non-negative with a positive sum, got {list(ratios)}")
    shares = np.asarray(ratios, dtype=np.float64)
    bounds = [0.0]
    for share in (shares / shares.sum()).tolist():
        bounds.append(bounds[-1] + share)
    return [(int(round(a * float(num_docs))), int(round(b * float(num_docs)))) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class SampleConfig:
    seq_length: int
    num_samples: Optional[int]  # None: one epoch (what Megatron builds for an unweighted blend)
    seed: int
    mode: str = "packed"  # packed | document
    doc_start: int = 0
    doc_stop: int = -1  # -1: to the end


def _data_fingerprint(ds: IndexedDataset) -> str:
    return hashlib.md5(ds.sizes.tobytes()).hexdigest()


def epochs_for(tokens_per_epoch: int, units_needed: int | None) -> int:
    """Whole passes over the data that hold `units_needed` (tokens or documents; None: one pass)."""
    return 1 if units_needed is None else max(1, -(-units_needed // tokens_per_epoch))


def packed_indices(sizes: np.ndarray, seq_length: int, num_samples: int | None, seed: int):
    """(doc_idx, sample_idx, shuffle_idx) for `num_samples` packed samples (None: one epoch) from documents of
    `sizes`."""
    docs = len(sizes)
    per_epoch = int(sizes.sum(dtype=np.int64))
    if per_epoch < 2 or docs == 0:
        raise DataError(f"cannot build samples from {docs} documents with {per_epoch} tokens")
    epochs = epochs_for(per_epoch, None if num_samples is None else num_samples * seq_length + 1)
    separate = False
    if epochs > 1:
        from_earlier = ((epochs - 1) * per_epoch - 1) // seq_length
        per_epoch_samples = (per_epoch - 1) // seq_length
        separate = num_samples - from_earlier < int(SEPARATE_LAST_EPOCH_BELOW * per_epoch_samples)
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
    where[0] = 0  # the first sample starts at the first document even when that one is empty, as in Megatron
    sample_idx = np.stack([where, starts - (ends[where] - lengths[where])], axis=1)
    if separate:
        first = ((epochs - 1) * per_epoch - 1) // seq_length
        shuffle_idx = np.concatenate([rng.permutation(first), first + rng.permutation(total - first)])
    else:
        shuffle_idx = rng.permutation(total)
    return doc_idx, sample_idx, shuffle_idx.astype(np.int64)


def document_indices(num_docs: int, num_samples: int | None, seed: int) -> np.ndarray:
    """One document per sample: every document once per epoch, each epoch in its own shuffled order."""
    rng = np.random.RandomState(seed)
    return np.concatenate([rng.permutation(num_docs) for _ in range(epochs_for(num_docs, num_samples))]).astype(
        np.int64)


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
        self.description = {"version": INDEX_VERSION, "class": "GPTDataset", **asdict(cfg), "doc_stop": stop,
                            "data": _data_fingerprint(indexed), "sequences": len(indexed)}
        self.cache_prefix = cache_prefix(cache_dir or indexed.cache_dir, self.description, f"{name}-{cfg.mode}")
        arrays = load_or_build(self.cache_prefix, self._names(), self._build, self._consistent, self.description)
        if cfg.mode == "packed":
            self.doc_idx, self.sample_idx, self.shuffle_idx = arrays
            self.length = len(self.shuffle_idx)
        else:
            (self.doc_idx,) = arrays
            self.length = len(self.doc_idx)
        if self.length < (cfg.num_samples or 0):
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

    def _consistent(self, arrays: list[np.ndarray]) -> bool:
        start, stop = self.doc_range
        doc_idx = arrays[0]
        ok = doc_idx.ndim == 1 and len(doc_idx) > 0 and doc_idx.min() >= start and doc_idx.max() < stop
        if ok and self.cfg.mode == "packed":
            sample_idx, shuffle_idx = arrays[1], arrays[2]
            ok = (sample_idx.ndim == 2 and sample_idx.shape[1] == 2 and len(shuffle_idx) == len(sample_idx) - 1
                  and sample_idx[:, 0].max() < len(doc_idx) and shuffle_idx.min() >= 0
                  and shuffle_idx.max() < len(shuffle_idx))
        return bool(ok)

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
