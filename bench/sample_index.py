#!/usr/bin/env python3
"""Index-build time of weighted blends at pretraining scale: ours against the code before Megatron-identical
blending and against megatron-core's C++ helpers, with the arrays checked equal to megatron-core's (run by hand).

    python bench/sample_index.py [--repeats 3] [--baseline 6f0cece] [--many 32]

Synthetic document lists (no .bin needed: the indices depend only on document sizes), 4.5M documents of mean ~2,000
tokens in all, for a 10B-token run at seq 2048 (4,882,813 samples):
- three datasets of 3M, 1M and 0.5M documents blended 0.6/0.3/0.1;
- the same documents as `--many` datasets of equal size with random weights (a blend of many prefixes).
A build is every dataset's document, sample and shuffle index plus the blend's two arrays, in memory (caching to .npy
is the same for all). Baseline: megaqkv/data/gpt_dataset.py at --baseline (the commit before this change:
per-dataset seeds, its own interleaving and +2 margin), read with `git show`. Times are medians of --repeats,
the builds taking turns.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaqkv.data.blending import blending_indices, normalize  # noqa: E402
from megaqkv.data.builder import MID_LEVEL_SURPLUS, per_dataset_sizes  # noqa: E402
from megaqkv.data.gpt_dataset import packed_indices  # noqa: E402

SEQ, SEED, TOKENS = 2048, 1234, 10_000_000_000


def scenarios(many: int) -> list[tuple[str, list[np.ndarray], list[float]]]:
    rng = np.random.default_rng(0)
    three = [rng.integers(1, 4000, size=n).astype(np.int32) for n in (3_000_000, 1_000_000, 500_000)]
    split = np.array_split(np.concatenate(three), many)
    return [("3 datasets, 0.6/0.3/0.1", three, [0.6, 0.3, 0.1]),
            (f"{many} datasets, random weights", split, list(rng.random(many) + 0.1))]


def baseline_module(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:megaqkv/data/gpt_dataset.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("megaqkv.data.baseline_gpt_dataset")
    module.__package__ = "megaqkv.data"  # its relative import of .indexed resolves to today's
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:megaqkv/data/gpt_dataset.py", "exec"), module.__dict__)
    return module


def baseline_builds(old):
    """(datasets, blend) builders of the code before this change: seeds SEED + i, its counts and interleaving."""
    def datasets(sizes, weights, samples):
        counts = old.blend_sample_counts(weights, samples)
        return [old.packed_indices(s, SEQ, n, SEED + i) for i, (s, n) in enumerate(zip(sizes, counts))]

    return datasets, lambda weights, samples: old.blend_indices(weights, samples)


def our_datasets(sizes, weights, samples):
    w = normalize(weights)
    return [packed_indices(s, SEQ, n, SEED) for s, n in zip(sizes, per_dataset_sizes(w, samples, MID_LEVEL_SURPLUS))]


def our_blend(weights, samples):
    w = normalize(weights)
    return blending_indices(normalize(w), sum(per_dataset_sizes(w, samples)))


def megatron_datasets(sizes, weights, samples):
    """megatron-core's own GPTDataset index steps (its C++ sample index) on the same sizes."""
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index

    parts = []
    for s, n in zip(sizes, per_dataset_sizes(normalize(weights), samples, MID_LEVEL_SURPLUS)):
        tokens = int(s.sum(dtype=np.int64))
        epochs = -(-(n * SEQ + 1) // tokens)
        per_epoch = (tokens - 1) // SEQ
        before_last = ((epochs - 1) * tokens - 1) // SEQ
        separate = epochs > 1 and n - before_last < int(0.8 * per_epoch)
        rng = np.random.RandomState(SEED)
        doc_idx = _build_document_index(np.arange(len(s), dtype=np.int32), epochs, rng, separate)
        sample_idx = helpers.build_sample_idx(s, doc_idx, SEQ, epochs, tokens, True, True)
        total = sample_idx.shape[0] - 1
        parts.append((doc_idx, sample_idx, _build_shuffle_index(before_last if separate else total, total, rng)))
    return parts


def megatron_blend(weights, samples):
    """megatron-core's C++ build_blending_indices, as its BlendedDataset calls it."""
    from megatron.core.datasets import helpers

    w = normalize(weights)
    size = sum(per_dataset_sizes(w, samples))
    index, sample = np.zeros(size, np.int16), np.zeros(size, np.int64)
    helpers.build_blending_indices(index, sample, np.asarray(normalize(w)), len(w), size, False)
    return index, sample


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default="6f0cece", help="git revision of the code before this change")
    parser.add_argument("--many", type=int, default=32, help="datasets in the many-prefix blend")
    args = parser.parse_args()
    samples = (TOKENS - 1) // SEQ + 1
    builds = {f"baseline {args.baseline}": baseline_builds(baseline_module(args.baseline)),
              "megaqkv (this change)": (our_datasets, our_blend)}
    try:
        import megatron.core.datasets.helpers  # noqa: F401

        builds["megatron-core C++ helpers"] = (megatron_datasets, megatron_blend)
    except ImportError:
        print("megatron-core not installed: no reference row, no equality check")
    print(f"{samples:,} blended samples of seq {SEQ}, {args.repeats} repeats\n")
    print("| blend | build | datasets s | blend s | total s | vs baseline |\n|---|---|---|---|---|---|")
    same = True
    for scenario, sizes, weights in scenarios(args.many):
        times, arrays = {name: ([], []) for name in builds}, {}
        for _ in range(args.repeats):  # the builds take turns, so that a busy moment of the machine hits all alike
            for name, (datasets, blend) in builds.items():
                t_data, parts = timed(datasets, sizes, weights, samples)
                t_blend, mixed = timed(blend, weights, samples)
                times[name][0].append(t_data)
                times[name][1].append(t_blend)
                arrays[name] = (parts, mixed)
        rows = [(name, statistics.median(d), statistics.median(b)) for name, (d, b) in times.items()]
        base = rows[0][1] + rows[0][2]
        for name, t_data, t_blend in rows:
            print(f"| {scenario} | {name} | {t_data:.2f} | {t_blend:.2f} | {t_data + t_blend:.2f} | "
                  f"{(t_data + t_blend) / base:.2f}x |")
        if "megatron-core C++ helpers" in arrays:
            (ours, our_mix), (theirs, their_mix) = arrays["megaqkv (this change)"], arrays["megatron-core C++ helpers"]
            same = same and all(np.array_equal(a, b) for p, q in zip(ours, theirs) for a, b in zip(p, q))
            same = same and all(np.array_equal(a, b) for a, b in zip(our_mix, their_mix))
    if len(builds) == 3:
        print(f"\nevery array identical to megatron-core's: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
