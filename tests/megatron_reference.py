"""megatron-core's own BlendedMegatronDatasetBuilder + GPTDataset next to ours: build a blend's splits both ways and
compare index arrays and tokens (tests/test_megatron_samples.py on tiny data, bench/megatron_samples.py on the
benchmark corpus). Importing this needs megatron-core."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizer

from megaqkv.data.blending import BlendedDataset
from megaqkv.data.builder import SPLITS, build_split

NO_DATASET = "none (no dataset, as in Megatron)"
logging.getLogger("megatron").setLevel(logging.ERROR)  # its builders log every step (and that blends are not cached)


def megatron_splits(seq: int, seed: int, sizes: Sequence[int], blend=None, blend_per_split=None, split=None):
    """megatron-core's [train, valid, test] (None where it builds none). Its tokenizer is the real null tokenizer
    (the samples do not depend on it); torch.distributed stays uninitialised, which megatron-core supports."""
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq, blend=blend, blend_per_split=blend_per_split, split=split,
        tokenizer=MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=50_000),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(MegatronGPTDataset, list(sizes), lambda: True, config).build()


def _index_difference(ours, theirs) -> str | None:
    """The first index array that differs (None: all equal), the blend's and each of its datasets'."""
    pairs = []
    if isinstance(ours, BlendedDataset):
        pairs += [("dataset_index", ours.dataset_index, theirs.dataset_index),
                  ("dataset_sample_index", ours.dataset_sample_index, theirs.dataset_sample_index)]
        parts = list(zip(ours.datasets, theirs.datasets))
    else:
        parts = [(ours, theirs)]
    for i, (p, q) in enumerate(parts):
        pairs += [(f"dataset {i} document_index", p.doc_idx, q.document_index),
                  (f"dataset {i} sample_index", p.sample_idx, q.sample_index),
                  (f"dataset {i} shuffle_index", p.shuffle_idx, q.shuffle_index)]
    return next((name for name, a, b in pairs if not np.array_equal(a, b)), None)


def first_difference(ours, theirs) -> tuple[int, str]:
    """(samples compared, where the two first differ: an index array, a sample's tokens, or 'none')."""
    if len(ours) != len(theirs):
        return 0, f"length {len(ours):,} vs {len(theirs):,}"
    arrays = _index_difference(ours, theirs)
    if arrays:
        return 0, arrays
    for i in range(len(ours)):
        s = theirs[i]
        if not np.array_equal(ours[i]["tokens"], np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]])):
            return i + 1, f"sample {i:,}"
    return len(ours), "none"


def compare(case: str, prefixes: Sequence[str], weights: Sequence[float] | None, sizes: Sequence[int], seq: int,
            seed: int, cache_dir: Path, ratios: Sequence[float] | None = (90, 7, 3)) -> list[tuple[str, str, int, str]]:
    """Rows (case, split, samples compared, first difference) for every split. Without `ratios`, each split has its own
    paths (Megatron's --train/valid-data-path, here the same blend for train and valid); otherwise one blend is split
    by `ratios`, which must give every split of a positive share at least one document of every prefix (Megatron
    loops forever on an empty one)."""
    blend = (list(prefixes), None if weights is None else list(weights))
    if ratios is None:
        theirs = megatron_splits(seq, seed, sizes, blend_per_split=[blend, blend, None])
    else:
        theirs = megatron_splits(seq, seed, sizes, blend=blend, split=",".join(str(r) for r in ratios))
    rows = []
    for split, name in enumerate(SPLITS[:2] if ratios is None else SPLITS):
        ours = build_split(prefixes, weights, sizes[split], seq, seed, ratios=ratios, split=split,
                           cache_dir=cache_dir / case.replace(" ", "_").replace("/", "_"))
        if ours is None or theirs[split] is None:
            rows.append((case, name, 0, NO_DATASET if ours is theirs[split] else "one side built no dataset"))
        else:
            rows.append((case, name, *first_difference(ours, theirs[split])))
    return rows
