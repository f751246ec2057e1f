"""Our samples against megatron-core's own BlendedMegatronDatasetBuilder + GPTDataset (its C++ helpers included):
the same index arrays and the same tokens, sample by sample, for every split of single prefixes, weighted and
unweighted blends, separate per-split paths, and sizes around the epoch boundaries.

Run with `-s` to see the comparison table (cases, samples compared, first difference).
"""
import numpy as np
import pytest

megatron_builder = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder")
from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig  # noqa: E402
from megatron.core.tokenizers import MegatronTokenizer  # noqa: E402

from megaqkv.data.blending import BlendedDataset, blending_indices  # noqa: E402
from megaqkv.data.builder import SPLITS, build_split  # noqa: E402
from megaqkv.data.gpt_dataset import GPTDataset  # noqa: E402
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


def megatron_splits(seed, sizes, blend=None, blend_per_split=None, split=None):
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=SEQ, blend=blend, blend_per_split=blend_per_split, split=split,
        tokenizer=MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=50_000),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    return megatron_builder.BlendedMegatronDatasetBuilder(MegatronGPTDataset, sizes, lambda: True, config).build()


def same_gpt_indices(ours: GPTDataset, theirs) -> None:
    assert np.array_equal(ours.doc_idx, theirs.document_index)
    assert np.array_equal(ours.sample_idx, theirs.sample_index)
    assert np.array_equal(ours.shuffle_idx, theirs.shuffle_index)


def first_difference(ours, theirs) -> tuple[int, str]:
    """(samples compared, index of the first sample whose tokens differ or 'none')."""
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        s = theirs[i]
        text = np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]])
        if not np.array_equal(ours[i]["tokens"], text):
            return len(ours), str(i)
    return len(ours), "none"


def compare(case, prefixes, weights, sizes, seed=1234, ratios=(90, 7, 3), separate=False, tmp_path=None):
    """Build every split both ways and check index arrays and tokens. `separate`: each split has its own paths
    (Megatron's --train/valid/test-data-path); otherwise one blend is split by `ratios`, which must give every split
    of a positive share at least one document of every prefix (Megatron loops forever on an empty one)."""
    blend = (list(prefixes), None if weights is None else list(weights))
    if separate:
        theirs = megatron_splits(seed, sizes, blend_per_split=[blend, blend, None])
    else:
        theirs = megatron_splits(seed, sizes, blend=blend, split=",".join(str(r) for r in ratios))
    for split, name in enumerate(SPLITS):
        if separate and split == 2:
            continue
        ours = build_split(prefixes, weights, sizes[split], SEQ, seed, ratios=None if separate else ratios,
                           split=split, cache_dir=tmp_path / case.replace(" ", "_"))
        assert (ours is None) == (theirs[split] is None), (case, name)
        if ours is None:
            ROWS.append((case, name, 0, "none (no dataset, as in Megatron)"))
            continue
        if isinstance(ours, BlendedDataset):
            assert np.array_equal(ours.dataset_index, theirs[split].dataset_index)
            assert np.array_equal(ours.dataset_sample_index, theirs[split].dataset_sample_index)
            for part, their_part in zip(ours.datasets, theirs[split].datasets):
                same_gpt_indices(part, their_part)
        else:
            same_gpt_indices(ours, theirs[split])
        n, first = first_difference(ours, theirs[split])
        ROWS.append((case, name, n, first))
        assert first == "none", (case, name, first)


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
    sizes = [per_epoch + delta, 2 * per_epoch + delta, threshold + delta]
    compare(f"epoch boundary {delta:+d}", [corpus["c"]], None, sizes, separate=True, tmp_path=tmp_path)
    compare(f"threshold {delta:+d}", [corpus["c"]], None, [threshold + delta, 1, 1], ratios=(1, 0, 0),
            tmp_path=tmp_path)


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
    compare("per-split paths, blend 0.6/0.4", [corpus["a"], corpus["c"]], [0.6, 0.4], [1500, 200, 0], separate=True,
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
