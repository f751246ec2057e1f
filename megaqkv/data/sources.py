"""Streaming readers for preprocessing inputs: jsonl (plain, .zst, .gz), parquet, local HF datasets.

Each input yields (line or row number, payload) without loading the file: jsonl payloads are the
raw line bytes (parsed in the worker processes), parquet and datasets rows arrive as dicts. A
compressed input that is cut short or corrupt ends with a `Damage` payload rather than an
exception, so that everything read before the damage is kept.
"""
from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SPLIT_NAMES = ("train", "validation", "test")
JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.zst", ".json.gz")


class InputError(ValueError):
    """An input path that cannot be read; the message says which and why."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # jsonl | parquet | hf
    split: str | None  # train / validation / test, from the nearest folder of that name
    size: int  # bytes on disk, for progress
    hf_split: str | None = None  # split name inside a saved DatasetDict

    @property
    def name(self) -> str:
        return f"{self.path}[{self.hf_split}]" if self.hf_split else str(self.path)

    def fingerprint(self) -> list:
        stat = self.path.stat()
        return [self.name, stat.st_size, stat.st_mtime_ns]


def _split_of(path: Path, root: Path) -> str | None:
    for part in [path.parent, *path.parent.parents]:
        if part.name in SPLIT_NAMES:
            return part.name
        if part == root.parent or part == part.parent:
            return None
    return None


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def _hf_inputs(path: Path) -> list[InputFile]:
    size = sum(f.stat().st_size for f in path.rglob("*.arrow"))
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return [InputFile(path, "hf", s if s in SPLIT_NAMES else None, size // max(1, len(splits)), s) for s in splits]
    return [InputFile(path, "hf", _split_of(path / "x", path), size)]


def discover(inputs: list[str]) -> list[InputFile]:
    """Every readable input under the given paths, in a stable (sorted) order."""
    found: list[InputFile] = []
    for raw in inputs:
        root = Path(raw)
        if not root.exists():
            raise InputError(f"{root}: no such file or directory")
        if _is_hf_dataset(root):
            found += _hf_inputs(root)
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and (p.name.endswith(JSONL_SUFFIXES)
                                                                           or p.suffix == ".parquet"))
            if not files:
                raise InputError(f"{root}: no *.jsonl, *.jsonl.zst, *.jsonl.gz or *.parquet files inside")
            found += [InputFile(p, "parquet" if p.suffix == ".parquet" else "jsonl", _split_of(p, root),
                                p.stat().st_size) for p in files]
        elif root.name.endswith(JSONL_SUFFIXES) or root.suffix == ".parquet":
            found.append(InputFile(root, "parquet" if root.suffix == ".parquet" else "jsonl",
                                   _split_of(root, root.parent), root.stat().st_size))
        else:
            raise InputError(f"{root}: unsupported input; give a folder, *.jsonl[.zst|.gz], *.parquet or a saved "
                             "Hugging Face datasets directory")
    return found


@dataclass(frozen=True)
class Damage:
    """Ends the records of a compressed input that cannot be decoded to its end (cut short or corrupt); the
    line it names is the first one not read. The records before it decoded without error, but a checksum is
    checked only at a frame's end, so a frame that fails it may have yielded garbage (mostly bad JSON) first."""

    reason: str


class _Frames(io.RawIOBase):
    """A compressed file decoded frame by frame (zstd frames, gzip members), raising EOFError when it ends
    inside one: zstandard's stream_reader returns a plain EOF there (a cut-off file would read as a shorter
    complete one), and GzipFile drops what it decoded in the read that fails."""

    def __init__(self, raw, new_frame):
        self._raw, self._new_frame, self._frame, self._out = raw, new_frame, None, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            if self._frame is not None and self._frame.eof:  # the rest of the input starts the next frame
                data, self._frame = self._frame.unused_data, None
            else:
                data = self._raw.read(1 << 16)
                if not data and self._frame is not None:
                    raise EOFError("the file ends inside a compressed frame")
                if not data:
                    return 0
            if data:
                self._frame = self._frame or self._new_frame()
                self._out = memoryview(self._frame.decompress(data))
        n = min(len(buffer), len(self._out))
        buffer[:n], self._out = self._out[:n], self._out[n:]
        return n


def _open_text_lines(path: Path) -> tuple[io.BufferedReader, io.BufferedReader, tuple[type[Exception], ...]]:
    """(line reader, the file underneath, the exceptions that mean the compressed stream is damaged)."""
    raw = open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        frames = _Frames(raw, zstandard.ZstdDecompressor().decompressobj)
        return io.BufferedReader(frames, buffer_size=1 << 20), raw, (EOFError, zstandard.ZstdError)
    if path.name.endswith(".gz"):
        frames = _Frames(raw, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))  # 16: gzip header and CRC
        return io.BufferedReader(frames, buffer_size=1 << 20), raw, (EOFError, zlib.error)
    return io.BufferedReader(raw, buffer_size=1 << 20), raw, ()


def read_records(f: InputFile, keys: list[str], start: int = 0) -> Iterator[tuple[int, object, int]]:
    """(1-based line/row number, payload, bytes of the input consumed so far), from record `start + 1` on.

    A damaged compressed input ends with a `Damage` payload at the first line it could not read; the
    partial line before the damage is not yielded (it would look like malformed JSON)."""
    if f.kind == "jsonl":
        reader, raw, damaged = _open_text_lines(f.path)
        number = 0
        with reader, raw:
            try:
                for number, line in enumerate(reader, start=1):
                    if number > start:
                        yield number, line, raw.tell()
            except damaged as exc:
                codec = "zstd" if f.path.name.endswith(".zst") else "gzip"
                yield number + 1, Damage(f"truncated or corrupt {codec} stream after {raw.tell():,} compressed "
                                         f"bytes ({exc})"), raw.tell()
        return
    if f.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f.path)
        wanted = [c for c in pf.schema_arrow.names if c in set(keys) | {"meta"}]
        total, number = max(1, pf.metadata.num_rows), 0
        for batch in pf.iter_batches(batch_size=1024, columns=wanted):
            for row in batch.to_pylist():
                number += 1
                if number > start:
                    yield number, row, f.size * number // total
        return
    import datasets

    ds = datasets.load_from_disk(str(f.path))
    if f.hf_split:
        ds = ds[f.hf_split]
    columns = [c for c in ds.column_names if c in set(keys) | {"meta"}]
    selected = ds.select_columns(columns) if columns else None
    total = max(1, len(ds))
    for begin in range(start, len(ds), 1024):
        end = min(begin + 1024, len(ds))
        rows = selected[begin:end] if selected is not None else {}
        for i in range(end - begin):
            yield begin + i + 1, {c: rows[c][i] for c in rows}, f.size * (begin + i + 1) // total
