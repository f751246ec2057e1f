"""GPT samples: packing properties, Megatron's epoch rules, document mode, cache, splits, blending, resume.
(Equality with megatron-core itself: test_megatron_samples.py.)"""
import json
from pathlib import Path

import numpy as np
import pytest

from megaqkv.config import load_config
from megaqkv.data.blending import BlendedDataset, blending_indices, normalize
from megaqkv.data.builder import build_split, per_dataset_sizes
from megaqkv.data.gpt_dataset import GPTDataset, SampleConfig, micro_batch_indices, packed_indices, split_ranges
from megaqkv.data.indexed import DataError, IndexedDataset, IndexedDatasetWriter
from megaqkv.training.data import build_datasets

from conftest import MODEL_CONFIGS, REPO


@pytest.fixture
def corpus(tmp_path):
    """60 documents of 1-40 tokens whose values encode (document, position): every token is identifiable."""
    rng = np.random.default_rng(3)
    w = IndexedDatasetWriter(tmp_path / "c", np.int32)
    docs = []
    for d in range(60):
        doc = d * 1000 + np.arange(rng.integers(1, 41))
        docs.append(doc)
        w.add_document(doc.astype(np.int32))
    w.finalize()
    return IndexedDataset(tmp_path / "c"), docs


def reference_sample_starts(lengths, seq_length, count):
    """Straightforward walk over the documents, independent of the vectorised build."""
    out, doc, offset = [], 0, 0
    for k in range(count + 1):
        remaining = k * seq_length
        doc, offset = 0, 0
        while remaining >= lengths[doc] - offset:
            remaining -= lengths[doc] - offset
            doc, offset = doc + 1, 0
        out.append((doc, offset + remaining))
    return out


def test_sample_index_matches_a_plain_walk():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=40).astype(np.int32)
    doc_idx, sample_idx, _ = packed_indices(sizes, 16, 30, seed=1)
    assert sample_idx.tolist() == [list(t) for t in reference_sample_starts(sizes[doc_idx], 16, len(sample_idx) - 1)]


def test_one_epoch_uses_every_token_once(corpus):
    ds, docs = corpus
    L = 16
    per_epoch = sum(len(d) for d in docs)
    g = GPTDataset(ds, SampleConfig(seq_length=L, num_samples=(per_epoch - 1) // L, seed=5))
    assert sorted(g.doc_idx.tolist()) == list(range(60))  # one epoch: each document exactly once
    ordered = [g[int(np.argsort(g.shuffle_idx)[k])]["tokens"] for k in range(len(g))]  # unshuffled order
    assert all(len(s) == L + 1 for s in ordered)
    assert all(a[-1] == b[0] for a, b in zip(ordered, ordered[1:]))  # consecutive samples share one token
    stream = np.concatenate([ordered[0]] + [s[1:] for s in ordered[1:]])
    expected = np.concatenate([docs[d] for d in g.doc_idx])
    assert np.array_equal(stream, expected[:len(stream)]) and len(expected) - len(stream) < L
    assert g[0]["loss_mask"].tolist() == [1.0] * L


def test_epochs_and_separate_last_epoch():
    sizes = np.full(10, 10, dtype=np.int32)  # 100 tokens per epoch, 9 samples of 10 per epoch
    doc_idx, sample_idx, shuffle = packed_indices(sizes, 10, 20, seed=0)  # 2.2 epochs: last one separate
    assert len(doc_idx) == 30 and np.bincount(doc_idx).tolist() == [3] * 10
    assert sorted(doc_idx[20:].tolist()) == list(range(10))  # the last epoch shuffled on its own
    first = (2 * 100 - 1) // 10
    assert sorted(shuffle[:first].tolist()) == list(range(first))  # earlier epochs' samples come first
    doc_idx, _, _ = packed_indices(sizes, 10, 27, seed=0)  # last epoch used >= 80%: shuffled together
    assert sorted(doc_idx[20:].tolist()) != list(range(10))


def test_last_epoch_threshold_is_megatrons_integer_one():
    """12 documents of 10 tokens, seq 10: 11 samples per epoch, int(0.8 × 11) = 8 (the float is 8.8). The third epoch
    used for 8 samples is not separate (Megatron: 8 < 8 is false), for 7 it is."""
    sizes = np.full(12, 10, dtype=np.int32)
    before_last = (2 * 120 - 1) // 10
    for from_last, separate in ((8, False), (7, True)):
        doc_idx, _, _ = packed_indices(sizes, 10, before_last + from_last, seed=0)
        assert len(doc_idx) == 36 and (sorted(doc_idx[24:].tolist()) == list(range(12))) == separate


def test_determinism_and_seed(corpus, tmp_path):
    ds, _ = corpus
    a = GPTDataset(ds, SampleConfig(8, 50, seed=1), cache_dir=tmp_path / "a")
    b = GPTDataset(ds, SampleConfig(8, 50, seed=1), cache_dir=tmp_path / "b")
    c = GPTDataset(ds, SampleConfig(8, 50, seed=2), cache_dir=tmp_path / "c")
    assert all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(50))
    assert not all(np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(50))


def test_cache_reused_rebuilt_when_corrupt_and_keyed_by_data(corpus, tmp_path):
    ds, docs = corpus
    cfg = SampleConfig(8, 40, seed=3)
    g = GPTDataset(ds, cfg)
    files = sorted(g.cache_prefix.parent.glob(g.cache_prefix.name + "-*"))
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["description.json", "doc_idx.npy", "sample_idx.npy",
                                                         "shuffle_idx.npy"]
    stamp = files[1].stat().st_mtime_ns
    GPTDataset(ds, cfg)
    assert files[1].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    first = g[0]["tokens"].copy()
    files[2].write_bytes(b"garbage")  # a damaged cache file is detected and rebuilt
    assert np.array_equal(GPTDataset(ds, cfg)[0]["tokens"], first)
    np.save(files[3], np.full(len(g), 10 ** 6))  # an inconsistent (out of range) index too
    assert np.array_equal(GPTDataset(ds, cfg)[0]["tokens"], first)
    w = IndexedDatasetWriter(tmp_path / "c", np.int32)  # same path, different data: a different cache
    for d in docs[:-1]:
        w.add_document(d.astype(np.int32))
    w.finalize()
    assert GPTDataset(IndexedDataset(tmp_path / "c"), cfg).cache_prefix != g.cache_prefix


def test_document_mode_masks_padding(corpus):
    ds, docs = corpus
    g = GPTDataset(ds, SampleConfig(seq_length=24, num_samples=120, seed=0, mode="document"))
    assert np.bincount(g.doc_idx[:60]).tolist() == [1] * 60 and np.bincount(g.doc_idx).tolist() == [2] * 60
    for i in range(120):
        doc = docs[int(g.doc_idx[i])]
        s = g[i]
        n = min(len(doc), 25)
        assert np.array_equal(s["tokens"][:n], doc[:n])
        assert s["loss_mask"].tolist() == [1.0] * (n - 1) + [0.0] * (24 - (n - 1))


def test_splits_cover_the_data(corpus):
    assert split_ranges(1000, [969, 30, 1]) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, [1, 0, 0]) == [(0, 10), (10, 10), (10, 10)]
    assert split_ranges(10, [5, 1, 1]) == [(0, 7), (7, 9), (9, 10)]  # 7.142..., 8.571... rounded as Megatron does
    ds, _ = corpus
    (a, b), (c, d) = split_ranges(len(ds), [80, 20])
    valid = GPTDataset(ds, SampleConfig(8, 10, seed=0, doc_start=c, doc_stop=d), name="valid")
    assert set(valid.doc_idx.tolist()) <= set(range(c, d))
    with pytest.raises(ValueError):
        split_ranges(10, [])


def test_blending_proportions(corpus, tmp_path):
    w = normalize([0.5, 0.3, 0.2])
    which, rank = blending_indices(w, 1000)
    for prefix in (10, 97, 500, 1000):  # Megatron's greedy keeps every prefix within about one sample of its share
        counts = np.bincount(which[:prefix], minlength=3)
        assert np.all(np.abs(counts - np.array(w) * prefix) <= 1.5), (prefix, counts)
    for i in range(3):  # each dataset is read in order 0, 1, 2, ...
        assert rank[which == i].tolist() == list(range((which == i).sum()))
    ds, _ = corpus
    blend = build_split([str(ds.idx_path)[:-4]] * 2, [3, 1], 100, 8, seed=4, cache_dir=tmp_path)
    assert [p.cfg.num_samples for p in blend.datasets] == per_dataset_sizes(normalize([3, 1]), 100, 0.005) == [76, 26]
    assert [p.cfg.seed for p in blend.datasets] == [4, 4]  # one seed for every dataset, as in Megatron
    assert len(blend) == 100 and np.bincount(blend.dataset_index).tolist() == [75, 25]
    assert np.array_equal(blend[0]["tokens"], blend.datasets[0][0]["tokens"])
    index_file = Path(f"{blend.cache_prefix}-dataset_index.npy")
    stamp = index_file.stat().st_mtime_ns
    again = BlendedDataset(blend.datasets, [3, 1], 100, tmp_path)
    assert np.array_equal(again.dataset_index, blend.dataset_index) and index_file.stat().st_mtime_ns == stamp


def test_blend_index_cache_is_rebuilt_when_damaged(corpus, tmp_path):
    ds, _ = corpus
    parts = [GPTDataset(ds, SampleConfig(8, 60, seed=1), tmp_path)] * 2
    blend = BlendedDataset(parts, [1, 2], 50, tmp_path)
    expected = np.array(blend.dataset_index)
    np.save(f"{blend.cache_prefix}-dataset_index.npy", np.full(50, 7, dtype=np.int16))  # a dataset that is not there
    assert np.array_equal(BlendedDataset(parts, [1, 2], 50, tmp_path).dataset_index, expected)


def config(tmp_path, *overrides):
    return load_config(MODEL_CONFIGS / "tiny_kv.yaml", REPO / "train_configs" / "tiny.yaml",
                       [f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def test_zero_validation_share_means_no_validation_set(corpus, tmp_path):
    ds, _ = corpus
    prefix = json.dumps([str(ds.idx_path)[:-4]])
    said = []
    train, valid = build_datasets(config(tmp_path, f"data.path={prefix}", "data.valid_path=[]", "data.split=[9, 0, 1]",
                                         "training.seq_length=8"), 20, 5, say=said.append)
    assert valid is None and len(train) >= 20 and train.doc_range == (0, 54)
    assert said == ["no validation set: data.split=[9.0, 0.0, 1.0] gives validation no share and data.valid_path is "
                    "empty, so evaluation is off (as in Megatron)"]


def test_eval_seed_fixes_the_validation_samples_whatever_the_training_seed(corpus, tmp_path):
    ds, _ = corpus
    prefix = json.dumps([str(ds.idx_path)[:-4]])

    def samples(*overrides):
        train, valid = build_datasets(config(tmp_path, f"data.path={prefix}", "data.valid_path=[]",
                                             "data.split=[6, 4, 0]", "training.seq_length=8", *overrides), 20, 10,
                                      say=print)
        return ([train[i]["tokens"].tolist() for i in range(20)], [valid[i]["tokens"].tolist() for i in range(10)])

    t1, v1 = samples("training.seed=1")
    t2, v2 = samples("training.seed=2")
    assert t1 != t2 and v1 != v2  # Megatron's default: one seed for both
    t3, v3 = samples("training.seed=2", "eval.seed=1")
    assert t3 == t2 and v3 == v1


def test_unweighted_prefixes_are_one_pass_each_and_say_so_when_short(corpus, tmp_path):
    ds, _ = corpus
    prefix = str(ds.idx_path)[:-4]
    cfg = config(tmp_path, f"data.path={json.dumps([prefix, prefix])}", f"data.valid_path={json.dumps([prefix])}",
                 "training.seq_length=8")
    per_pass = (int(ds.sizes.sum()) - 1) // 8
    train, _ = build_datasets(cfg, 2 * per_pass, 4, say=print)
    assert len(train) == 2 * per_pass and np.bincount(train.dataset_index).tolist() == [per_pass, per_pass]
    with pytest.raises(DataError, match=f"data.path lists 2 prefixes without weights: as in Megatron they are blended "
                                        f"in proportion to their sizes over one pass each, {2 * per_pass:,} samples of "
                                        f"9 tokens, but the train set needs {2 * per_pass + 1:,}; give weights"):
        build_datasets(cfg, 2 * per_pass + 1, 4, say=print)


def test_resume_reads_exactly_the_remaining_samples():
    full = list(micro_batch_indices(0, micro_batch_size=2, dp_size=3, dp_rank=1, total=60))
    resumed = list(micro_batch_indices(18, micro_batch_size=2, dp_size=3, dp_rank=1, total=60))
    assert resumed == full[3:] and full[0] == [2, 3]
    everyone = sorted(i for r in range(3) for b in micro_batch_indices(0, 2, 3, r, 60) for i in b)
    assert everyone == list(range(60))  # the DP ranks together read every sample once
