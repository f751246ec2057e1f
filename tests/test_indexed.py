"""The .bin/.idx format: pinned by bytes, round trips, Megatron-LM as an independent reader/writer, errors."""
import json
import struct

import numpy as np
import pytest

from megaqkv.data import indexed
from megaqkv.data.indexed import DTYPES, DataError, IndexedDataset, IndexedDatasetWriter, merge


def write(prefix, docs, dtype):
    w = IndexedDatasetWriter(prefix, dtype)
    for d in docs:
        w.add_document(np.asarray(d, dtype=dtype))
    w.finalize()
    return IndexedDataset(prefix)


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = np.dtype(DTYPES[code])
    rng = np.random.default_rng(code)
    docs = [rng.integers(0, 100, size=n).astype(dtype) for n in (5, 0, 17, 1, 300)]
    ds = write(tmp_path / "d", docs, dtype)
    assert ds.dtype == dtype and len(ds) == 5 and ds.num_documents == 5
    assert list(ds.sizes) == [5, 0, 17, 1, 300] and list(ds.doc_idx) == [0, 1, 2, 3, 4, 5]
    for got, want in zip((ds[i] for i in range(5)), docs):
        assert got.dtype == dtype and np.array_equal(got, want)
    assert np.array_equal(ds.get(4, offset=10, length=7), docs[4][10:17])
    assert (tmp_path / "d.idx").read_bytes()[9 + 8] == code


def pinned_index() -> bytes:
    """Written out by hand from the MMIDIDX v1 layout: 3 uint16 sequences of sizes 2, 0, 3."""
    return (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 3)
            + struct.pack("<Q", 4) + struct.pack("<3i", 2, 0, 3) + struct.pack("<3q", 0, 4, 4)
            + struct.pack("<4q", 0, 1, 2, 3))


def test_hand_built_index_bytes(tmp_path):
    (tmp_path / "h.idx").write_bytes(pinned_index())
    (tmp_path / "h.bin").write_bytes(struct.pack("<5H", 7, 8, 50256, 1, 2))
    ds = IndexedDataset(tmp_path / "h")
    assert [list(ds[i]) for i in range(3)] == [[7, 8], [], [50256, 1, 2]]
    ours = write(tmp_path / "o", [[7, 8], [], [50256, 1, 2]], np.uint16)
    assert ours.idx_path.read_bytes() == pinned_index()
    assert ours.bin_path.read_bytes() == (tmp_path / "h.bin").read_bytes()


def test_megatron_reads_ours_and_we_read_megatrons(tmp_path):
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch

    docs = [np.arange(n, dtype=np.uint16) * 3 for n in (4, 9, 1, 0, 6)]
    write(tmp_path / "ours", docs, np.uint16)
    theirs = indexed_dataset.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == 5 and list(theirs.document_indices) == [0, 1, 2, 3, 4, 5]
    assert all(np.array_equal(theirs[i], d) for i, d in enumerate(docs))

    builder = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "meg.idx"))
    mine = IndexedDataset(tmp_path / "meg")
    assert all(np.array_equal(mine[i], d) for i, d in enumerate(docs))
    assert (tmp_path / "meg.idx").read_bytes() == (tmp_path / "ours.idx").read_bytes()
    assert (tmp_path / "meg.bin").read_bytes() == (tmp_path / "ours.bin").read_bytes()


def corrupt(tmp_path, mutate):
    write(tmp_path / "c", [[1, 2, 3], [4, 5]], np.uint16)
    mutate(tmp_path / "c.idx", tmp_path / "c.bin")
    with pytest.raises(DataError) as err:
        IndexedDataset(tmp_path / "c")
    return str(err.value)


def patch(path, offset, data):
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("mutate, words", [
    (lambda idx, bin_: patch(idx, 0, b"XXIDIDX"), "not an MMIDIDX index (bad magic"),
    (lambda idx, bin_: patch(idx, 9, struct.pack("<Q", 2)), "index version 2, only version 1"),
    (lambda idx, bin_: patch(idx, 17, b"\x09"), "unknown dtype code 9"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-5]), "the file is truncated or corrupt"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:12]), "not an MMIDIDX index"),
    (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]), "the pair is truncated or mismatched"),
    (lambda idx, bin_: patch(idx, 34 + 16 + 8, struct.pack("<q", 7)), "document index does not run from 0 to 2"),
    (lambda idx, bin_: patch(idx, 34 + 8 + 8, struct.pack("<q", 2)), "sizes and byte pointers disagree"),
    (lambda idx, bin_: bin_.unlink(), "c.bin: not found"),
])
def test_damaged_files_name_the_file(tmp_path, mutate, words):
    message = corrupt(tmp_path, mutate)
    assert words in message and str(tmp_path / "c.") in message, message


def test_merge(tmp_path):
    a = write(tmp_path / "a", [[1, 2], [3]], np.uint16)
    write(tmp_path / "b", [[4, 5, 6]], np.uint16)
    m = merge([a.bin_path, tmp_path / "b"], tmp_path / "m")
    assert [list(m[i]) for i in range(3)] == [[1, 2], [3], [4, 5, 6]] and list(m.doc_idx) == [0, 1, 2, 3]
    write(tmp_path / "c", [[1]], np.int32)
    with pytest.raises(DataError, match="different token dtypes"):
        merge([tmp_path / "a", tmp_path / "c"], tmp_path / "x")


def test_writer_resumes_from_checkpoint_and_stays_invisible_until_done(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "r", np.uint16)
    w.add_documents(np.array([1, 2, 3, 4], np.uint16), np.array([1, 3]))
    mark = w.checkpoint()
    w.add_document(np.array([9, 9], np.uint16))  # lost in the "crash": after the checkpoint
    w.close()
    assert not (tmp_path / "r.bin").exists() and not (tmp_path / "r.idx").exists()
    w = IndexedDatasetWriter(tmp_path / "r", np.uint16, resume=mark)
    w.add_document(np.array([5], np.uint16))
    w.finalize()
    ds = IndexedDataset(tmp_path / "r")
    assert [list(ds[i]) for i in range(len(ds))] == [[1], [2, 3, 4], [5]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.bin", "r.idx"]


def test_max_token_id_is_scanned_in_chunks_cached_and_rescanned_when_the_data_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "SCAN_TOKENS", 2)  # several chunks, the largest id in the last, partial one
    ds = write(tmp_path / "m", [[5, 1], [2, 3, 9]], np.uint16)
    assert ds.max_token_id() == 9
    cache = ds.cache_dir / "m-max_token_id.json"
    entry = json.loads(cache.read_text())
    cache.write_text(json.dumps({**entry, "max_token_id": 4}))  # a stamped value is trusted, not rescanned
    assert IndexedDataset(tmp_path / "m").max_token_id() == 4
    write(tmp_path / "m", [[5, 1], [2, 3, 7]], np.uint16)  # same path and size, new data
    assert IndexedDataset(tmp_path / "m").max_token_id() == 7
    assert write(tmp_path / "e", [], np.uint16).max_token_id(cache_dir=tmp_path / "elsewhere") == -1
    assert (tmp_path / "elsewhere" / "e-max_token_id.json").is_file()
    with pytest.raises(DataError, match=r"m.bin: token ids go up to 7, but the model has a vocabulary of 7 \(ids 0 "
                                         r"to 6\); preprocess the data with the model's tokenizer"):
        IndexedDataset(tmp_path / "m").check_vocab(7, "the model")
    IndexedDataset(tmp_path / "m").check_vocab(8, "the model")
