"""Our samples against megatron-core's own BlendedMegatronDatasetBuilder + GPTDataset (its C++ helpers included):
the same index arrays and the same tokens, sample by sample, for every split of single prefixes, weighted and
unweighted blends, separate per-split paths, and sizes around the epoch boundaries.

Run with `-s` to see the comparison table (cases, samples compared, first difference).
"""
import numpy as np
import pytest

pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder")
from megatron_reference import NO_DATASET, compare as compare_with_megatron  # noqa: E402

from megaqkv.data.blending import blending_indices  # noqa: E402
from megaqkv.data.builder import build_split  # noqa: E402
from megaqkv.data.indexed import IndexedDataset, IndexedDatasetWriter  # noqa: E402

SEQ = 64
ROWS = []


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if ROWS:
        print("\n| case | split | samples compared | first difference |\n|---|---|---|---|")
        for case, split, n, first in ROWS:
            print(f"| {case} | {split} | {n:,} | {first} |")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three prefixes of uneven sizes (random tokens, so that any misplaced sample shows), one with an empty
    document, and the 100 documents of the issue's seq-64 case."""
    root = tmp_path_factory.mktemp("megatron_samples")

    def write(name, sizes, seed):
        rng = np.random.default_rng(seed)
        w = IndexedDatasetWriter(root / name, np.uint16)
        for n in sizes:
            w.add_document(rng.integers(0, 50_000, int(n)).astype(np.uint16))
        w.finalize()
        return str(root / name)

    rng = np.random.default_rng(0)
    return {"a": write("a", np.r_[0, rng.integers(1, 300, 199)], 1),
            "b": write("b", rng.integers(1, 90, 70), 2),
            "c": write("c", rng.integers(20, 500, 40), 3),
            "issue": write("issue", np.random.default_rng(8).integers(1, 120, 100), 4)}


def compare(case, prefixes, weights, sizes, seed=1234, ratios=(90, 7, 3), tmp_path=None):
    rows = compare_with_megatron(case, prefixes, weights, sizes, SEQ, seed, tmp_path, ratios)
    ROWS.extend(rows)
    assert all(first in ("none", NO_DATASET) for *_, first in rows), rows


def test_single_prefix(corpus, tmp_path):
    compare("single prefix, split 949/40/11", [corpus["a"]], None, [900, 40, 10], ratios=(949, 40, 11),
            tmp_path=tmp_path)


def test_the_issue_case_where_the_last_epoch_rule_differed(corpus, tmp_path):
    sizes = np.random.default_rng(8).integers(1, 120, 100)
    tokens, needed = int(sizes.sum()), 4627
    epochs = -(-(needed * SEQ + 1) // tokens)
    from_last = needed - ((epochs - 1) * tokens - 1) // SEQ
    per_epoch = (tokens - 1) // SEQ
    assert int(0.8 * per_epoch) <= from_last < 0.8 * per_epoch  # the float rule would separate the last epoch
    compare("seq 64, 100 documents, 4,627 samples", [corpus["issue"]], None, [needed, 30, 5], ratios=(1, 0, 0),
            tmp_path=tmp_path)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_sizes_around_the_epoch_boundaries(corpus, tmp_path, delta):
    """One epoch exactly, one sample over it, and the last epoch just below, at and above Megatron's threshold."""
    tokens = int(IndexedDataset(corpus["c"]).sizes.sum())
    per_epoch = (tokens - 1) // SEQ
    threshold = ((2 * tokens - 1) // SEQ) + int(0.8 * per_epoch)  # two whole epochs, then the threshold
    compare(f"epoch boundary {delta:+d}", [corpus["c"]], None, [per_epoch + delta, 2 * per_epoch + delta, 0],
            ratios=None, tmp_path=tmp_path)
    compare(f"threshold {delta:+d}", [corpus["c"]], None, [threshold + delta, 1, 1], ratios=(1, 0, 0),
            tmp_path=tmp_path)
    third = build_split([corpus["c"]], None, threshold + delta, SEQ, 1234, ratios=(1, 0, 0), cache_dir=tmp_path)
    assert (sorted(third.doc_idx[-40:].tolist()) == list(range(40))) == (delta < 0)  # below it: shuffled on its own


def test_weighted_blend_of_two(corpus, tmp_path):
    compare("blend 0.3/0.7", [corpus["a"], corpus["b"]], [0.3, 0.7], [1600, 120, 40], tmp_path=tmp_path)


def test_weighted_blend_of_three_with_splits(corpus, tmp_path):
    compare("blend 5/1/2, split 90/7/3", [corpus["a"], corpus["b"], corpus["c"]], [5, 1, 2], [2500, 300, 77],
            ratios=(90, 7, 3), seed=7, tmp_path=tmp_path)


def test_weighted_single_prefix_goes_through_the_blend(corpus, tmp_path):
    compare("one prefix, weight 1", [corpus["b"]], [1.0], [700, 50, 9], tmp_path=tmp_path)


def test_unweighted_blend_is_by_size_over_one_epoch(corpus, tmp_path):
    compare("unweighted a b c", [corpus["a"], corpus["b"], corpus["c"]], None, [700, 60, 30], tmp_path=tmp_path)


def test_separate_paths_per_split(corpus, tmp_path):
    compare("per-split paths, blend 0.6/0.4", [corpus["a"], corpus["c"]], [0.6, 0.4], [1500, 200, 0], ratios=None,
            tmp_path=tmp_path)


def test_zero_validation_share_builds_no_validation_set(corpus, tmp_path):
    compare("split 98/0/2", [corpus["a"], corpus["b"]], [0.4, 0.6], [500, 100, 20], ratios=(98, 0, 2),
            tmp_path=tmp_path)


def test_blending_indices_match_megatrons_helper(monkeypatch):
    """The vectorised greedy against Megatron's C++ build_blending_indices, on every path it takes: small random
    blends (few blocks, finished in order), large ones (a second parallel pass over the blocks whose guessed start was
    wrong), 40 datasets (numpy's argmax), and a dataset of weight 7e-8 chosen once, whose difference outlasts many
    blocks (finished in order, in plain Python)."""
    from megatron.core.datasets import helpers

    from megaqkv.data import blending

    paths = {"second pass": 0, "in order": 0}
    simulate, walk = blending._simulate, blending._walk

    def counted_simulate(*args, **kwargs):
        paths["second pass"] += len(args) > 6
        return simulate(*args, **kwargs)

    def counted_walk(*args):
        paths["in order"] += 1
        return walk(*args)

    monkeypatch.setattr(blending, "_simulate", counted_simulate)
    monkeypatch.setattr(blending, "_walk", counted_walk)
    rng = np.random.default_rng(11)
    cases = []
    for trial in range(30):
        w = rng.random(int(rng.integers(1, 9))) ** (1 + trial % 4)
        w[0] = 1e-5 if trial % 5 == 0 else w[0]
        cases.append((w, int(rng.integers(0, 5000))))
    cases += [([1, 1, 1, 1e-3], 5000), ([3, 3, 2, 2, 1e-3], 8000), ([1] * 40, 5000)]  # ties: the first index wins
    cases += [([0.3, 0.7], 100_000), ([5, 1, 2], 77_777), (rng.random(40), 30_000),
              (np.random.default_rng(7).random(7) ** 3, 600_000)]
    for w, size in cases:
        w = np.asarray(w, dtype=np.float64) / np.sum(w)
        index, sample = np.zeros(size, np.int16), np.zeros(size, np.int64)
        helpers.build_blending_indices(index, sample, w, len(w), size, False)
        ours = blending_indices(w, size)
        assert np.array_equal(ours[0], index) and np.array_equal(ours[1], sample), (w, size)
    assert paths["second pass"] and paths["in order"]
