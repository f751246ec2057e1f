"""Memory-mapped indexed token datasets (`.bin` + `.idx`), byte-compatible with Megatron-LM's MMIDIDX v1.

`.idx` layout, little endian:
    magic b"MMIDIDX\\x00\\x00" | u64 version (1) | u8 dtype code | u64 sequence count N |
    u64 document-index length D (documents + 1) | int32 sizes[N] | int64 byte pointers[N] |
    int64 document index[D] (starts at 0, ends at N)
`.bin` holds the sequences back to back in that dtype. Everything is read through
numpy.memmap; the index is checked against the file sizes before any array is touched,
so a damaged file is an error naming the file, not a crash deep inside numpy.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
SCAN_TOKENS = 16 << 20  # tokens per step of the max-token-id scan: bounded memory at any dataset size


class DataError(ValueError):
    """Unusable data on disk; the message names the file and what to do."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 tokens when the vocabulary fits (as Megatron does), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def write_index(path: Path, dtype: np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODES[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))


class IndexedDataset:
    """Read-only view of a `.bin`/`.idx` pair; `ds[i]` is sequence i as a numpy array (a memmap view)."""

    def __init__(self, prefix: str | Path):
        self.bin_path, self.idx_path = paths(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DataError(f"{p}: not found; build it with tools/preprocess_data.py")
        self.dtype, self.sizes, self.pointers, self.doc_idx = self._read_index()
        expected = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        actual = self.bin_path.stat().st_size
        if actual != expected:
            raise DataError(f"{self.bin_path}: {actual:,} bytes, but {self.idx_path.name} describes {expected:,} "
                            f"({len(self.sizes):,} sequences of {self.dtype}); the pair is truncated or mismatched, "
                            "rebuild it with tools/preprocess_data.py")
        self._bin = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if expected else np.empty(0, self.dtype)

    def _read_index(self):
        path = self.idx_path
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(_HEADER)
        if len(header) < _HEADER or header[:len(MAGIC)] != MAGIC:
            raise DataError(f"{path}: not an MMIDIDX index (bad magic {header[:len(MAGIC)]!r}); expected a .idx "
                            "written by megaqkv or Megatron-LM")
        version, code, count, doc_count = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise DataError(f"{path}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPES:
            raise DataError(f"{path}: unknown dtype code {code} (valid: {sorted(DTYPES)})")
        expected = _HEADER + count * (4 + 8) + doc_count * 8
        if size != expected:
            raise DataError(f"{path}: {size:,} bytes, but its header describes {count:,} sequences and "
                            f"{doc_count:,} document-index entries ({expected:,} bytes); the file is truncated or "
                            "corrupt, rebuild it")
        mm = np.memmap(path, mode="r", dtype=np.uint8)
        sizes = np.frombuffer(mm, dtype=np.int32, count=count, offset=_HEADER)
        pointers = np.frombuffer(mm, dtype=np.int64, count=count, offset=_HEADER + 4 * count)
        doc_idx = np.frombuffer(mm, dtype=np.int64, count=doc_count, offset=_HEADER + 12 * count)
        dtype = np.dtype(DTYPES[code])
        if doc_count < 1 or doc_idx[0] != 0 or doc_idx[-1] != count or np.any(np.diff(doc_idx) < 0):
            raise DataError(f"{path}: the document index does not run from 0 to {count} in order; the file is corrupt")
        if count and (sizes.min() < 0 or pointers[0] != 0 or np.any(
                pointers[1:] != np.cumsum(sizes[:-1], dtype=np.int64) * dtype.itemsize)):
            raise DataError(f"{path}: sequence sizes and byte pointers disagree; the file is corrupt")
        return dtype, sizes, pointers, doc_idx

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    @property
    def cache_dir(self) -> Path:
        """Default folder for what is derived from the data (sample indices, the max token id)."""
        return self.idx_path.parent / (self.idx_path.stem + "_cache")

    def _max_id_cache(self, cache_dir: str | Path | None) -> tuple[Path, list]:
        key = [[st.st_size, st.st_mtime_ns, st.st_ino] for st in (self.bin_path.stat(), self.idx_path.stat())]
        return Path(cache_dir or self.cache_dir) / f"{self.bin_path.stem}-max_token_id.json", key

    def max_token_id(self, cache_dir: str | Path | None = None) -> int:
        """Largest token id (-1 when empty). Preprocessing records it (`remember_max_token_id`); datasets from
        elsewhere (Megatron) are scanned once and cached, keyed by size, mtime and inode of both files: changed
        data is rescanned."""
        cache, key = self._max_id_cache(cache_dir)
        try:
            cached = json.loads(cache.read_text())
            if cached["files"] == key:
                return int(cached["max_token_id"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing or unreadable: scan
        top = max((int(self._bin[i:i + SCAN_TOKENS].max()) for i in range(0, len(self._bin), SCAN_TOKENS)),
                  default=-1)
        self.remember_max_token_id(top, cache_dir)
        return top

    def remember_max_token_id(self, top: int, cache_dir: str | Path | None = None) -> None:
        cache, key = self._max_id_cache(cache_dir)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"files": key, "max_token_id": top}))
            os.replace(tmp, cache)
        except OSError:
            pass  # a folder we cannot write only costs a scan next time

    def check_vocab(self, vocab_size: int, what: str, cache_dir: str | Path | None = None) -> None:
        """DataError unless every token id is below `vocab_size`: a larger id crashes the embedding lookup on
        one shard and, with tensor parallelism, silently reads another shard's rows."""
        top = self.max_token_id(cache_dir)
        if top >= vocab_size:
            raise DataError(f"{self.bin_path}: token ids go up to {top:,}, but {what} has a vocabulary of "
                            f"{vocab_size:,} (ids 0 to {vocab_size - 1:,}); preprocess the data with the model's "
                            f"tokenizer, or raise model.vocab_size to at least {top + 1:,} if this tokenizer is the "
                            "intended one")

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i."""
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        stop = start - offset + int(self.sizes[i]) if length is None else start + length
        return self._bin[start:stop]


class IndexedDatasetWriter:
    """Appends documents (one sequence each) to `prefix.bin`; `finalize()` writes `prefix.idx`.

    Tokens and sizes stream to temporary files (`.bin.tmp`, `.sizes.tmp`), so memory stays flat
    and an interrupted run can continue from a `checkpoint()`; the real names appear only when
    `finalize()` renames them (the `.idx` last), so a half-written pair never looks complete.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype, resume: tuple[int, int] | None = None):
        """`resume=(tokens, documents)` from an earlier `checkpoint()` continues that run's files."""
        self.bin_path, self.idx_path = paths(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._tmp_sizes = self.bin_path.with_name(self.bin_path.stem + ".sizes.tmp")
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self.tokens, self.documents = resume or (0, 0)
        if resume:
            for path, length in ((self._tmp_bin, self.tokens * self.dtype.itemsize), (self._tmp_sizes, 4 * self.documents)):
                if not path.is_file() or path.stat().st_size < length:
                    raise DataError(f"{path}: missing or shorter than the checkpoint says ({length:,} bytes); "
                                    "the partial output is damaged, delete it and start over")
                os.truncate(path, length)
        mode = "ab" if resume else "wb"
        self._bin, self._sizes = open(self._tmp_bin, mode), open(self._tmp_sizes, mode)
        self._prepared = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents concatenated in `tokens`, with their lengths."""
        lengths = np.asarray(lengths, dtype=np.int32)
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._sizes.write(lengths.tobytes())
        self.tokens += int(lengths.sum(dtype=np.int64))
        self.documents += len(lengths)

    def add_document(self, tokens: np.ndarray | Sequence[int]) -> None:
        self.add_documents(np.asarray(tokens), np.array([len(tokens)]))

    def checkpoint(self) -> tuple[int, int]:
        """Flush to disk; returns (tokens, documents) to resume from."""
        for f in (self._bin, self._sizes):
            f.flush()
            os.fsync(f.fileno())
        return self.tokens, self.documents

    def prepare(self) -> None:
        """Write the index under a temporary name: all the disk space `finalize()` needs, so that several
        writers can all be prepared (and a full disk found) before any final name appears."""
        self._bin.close()
        self._sizes.close()
        sizes = np.fromfile(self._tmp_sizes, dtype=np.int32)
        write_index(self._tmp_idx, self.dtype, sizes, np.arange(len(sizes) + 1, dtype=np.int64))
        self._prepared = True

    def finalize(self) -> tuple[Path, Path]:
        if not self._prepared:
            self.prepare()
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._tmp_sizes.unlink()
        return self.bin_path, self.idx_path

    def close(self) -> None:
        """Stop writing but keep the temporary files for a resumed run, which cuts them back to its checkpoint:
        so a buffer that cannot be flushed now (disk full) does not matter."""
        for f in (self._bin, self._sizes):
            with contextlib.suppress(OSError):
                f.close()


def merge(prefixes: Iterable[str | Path], output: str | Path) -> IndexedDataset:
    """Concatenate datasets (same dtype) into one, keeping document boundaries; streams the `.bin` files."""
    sources = [IndexedDataset(p) for p in prefixes]
    if not sources:
        raise DataError("merge: no input datasets given")
    dtypes = {str(s.dtype) for s in sources}
    if len(dtypes) > 1:
        raise DataError(f"merge: inputs have different token dtypes {sorted(dtypes)} "
                        f"({', '.join(str(s.bin_path) for s in sources)}); preprocess them with the same tokenizer")
    bin_path, idx_path = paths(output)
    tmp_bin, tmp_idx = (p.with_name(p.name + ".tmp") for p in (bin_path, idx_path))
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp_bin, "wb") as out:
        for s in sources:
            with open(s.bin_path, "rb") as f:
                shutil.copyfileobj(f, out, length=16 << 20)
    sizes = np.concatenate([s.sizes for s in sources])
    doc_idx, offset = [np.zeros(1, np.int64)], 0
    for s in sources:
        doc_idx.append(s.doc_idx[1:] + offset)
        offset += len(s)
    write_index(tmp_idx, sources[0].dtype, sizes, np.concatenate(doc_idx))
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    return IndexedDataset(output)
