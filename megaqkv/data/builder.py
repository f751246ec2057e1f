"""The samples of one split, chosen as megatron-core's `BlendedMegatronDatasetBuilder` chooses them.

- One prefix without a weight: a GPTDataset of exactly the requested size.
- Prefixes with weights: normalised weights; dataset i gets ceil(ceil(size × w_i) × 1.005) samples (Megatron's 0.5%
  surplus), all with the same seed; the blend holds sum_i ceil(size × w_i) samples (a few more than asked).
- Several prefixes without weights: one epoch of each, blended in proportion to those lengths, at most `size`.
- Documents come from a split of each prefix (`ratios` with an index: train, valid, test; a zero share builds
  nothing) or, without ratios, all of them (Megatron's separate per-split data paths).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .blending import BlendedDataset, normalize
from .gpt_dataset import GPTDataset, SampleConfig, split_ranges
from .indexed import IndexedDataset

MID_LEVEL_SURPLUS = 0.005  # megatron-core's mid_level_dataset_surplus default
SPLITS = ("train", "valid", "test")


def per_dataset_sizes(weights: Sequence[float], size: int, surplus: float = 0.0) -> list[int]:
    """Samples each dataset of a blend contributes (surplus 0) or is built with (MID_LEVEL_SURPLUS)."""
    return [int(math.ceil(math.ceil(size * w) * (1 + surplus))) for w in weights]


def build_split(prefixes: Sequence[str], weights: Sequence[float] | None, size: int, seq_length: int, seed: int, *,
                ratios: Sequence[float] | None = None, split: int = 0, mode: str = "packed",
                cache_dir: str | Path | None = None) -> GPTDataset | BlendedDataset | None:
    """The dataset of split `split` (0 train, 1 valid, 2 test) of the blend `prefixes` (with `weights`, or None),
    `size` samples; None when `ratios` give that split no share."""
    if ratios is not None and ratios[split] == 0:
        return None
    name = SPLITS[split]
    indexed = [IndexedDataset(p) for p in prefixes]

    def part(i: int, samples: int | None) -> GPTDataset:
        start, stop = (0, len(indexed[i])) if ratios is None else split_ranges(len(indexed[i]), ratios)[split]
        return GPTDataset(indexed[i], SampleConfig(seq_length, samples, seed, mode, start, stop), cache_dir, name)

    if weights is None and len(prefixes) == 1:
        return part(0, size)
    if weights is None:
        parts = [part(i, None) for i in range(len(prefixes))]
        lengths = [len(p) for p in parts]
        return BlendedDataset(parts, lengths, min(size, sum(lengths)), cache_dir, name)
    w = normalize(weights)
    parts = [part(i, n) for i, n in enumerate(per_dataset_sizes(w, size, MID_LEVEL_SURPLUS))]
    return BlendedDataset(parts, w, sum(per_dataset_sizes(w, size)), cache_dir, name)
