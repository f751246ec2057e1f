"""Corpus -> indexed datasets: parallel tokenisation with bounded memory, resumable, atomic outputs.

The main process streams the inputs in ~1 MB chunks of raw lines, worker processes parse and
tokenise them, and results come back in input order, so the output does not depend on the
number of workers. Progress is checkpointed (flushed partial files + a small JSON state) every
`checkpoint_seconds` and at each file end; re-running the same command continues from the last
checkpoint. Final `.bin`/`.idx` names appear only when everything is done. A compressed input
that is cut short or corrupt keeps what was read before the damage and is reported (exit status
3); a failed write (disk full, read-only folder) stops with one line saying what was kept.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .indexed import IndexedDataset, IndexedDatasetWriter, dtype_for_vocab, paths
from .sources import Damage, InputFile, discover, read_records
from .tokenizers import Tokenizer, build_tokenizer

STATE_VERSION = 1
EXIT_DAMAGED_INPUT = 3


class PreprocessError(RuntimeError):
    """Stops the run with a message naming the file and line (or the clash) and what to do."""


@dataclass
class Options:
    inputs: list[str]
    output_prefix: str
    tokenizer: str = "gpt2"
    keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = True
    workers: int = 1
    split_by_set: bool = False
    strict: bool = False
    overwrite: bool = False
    chunk_bytes: int = 1 << 20
    checkpoint_seconds: float = 30.0
    progress: bool = True


# --------------------------------------------------------------------------- per record (worker side)


def parse_record(payload, keys: list[str]) -> tuple[list[str] | None, str, str | None]:
    """(texts per key, set name, None) for a usable record, or (None, '', reason) for a bad one."""
    if isinstance(payload, bytes):
        try:
            line = payload.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            return None, "", f"not UTF-8 (bad byte at offset {exc.start})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return None, "", f"malformed JSON ({exc.msg}: column {exc.colno})"
    else:
        record = payload
    if not isinstance(record, dict):
        return None, "", f"not a JSON object ({type(record).__name__})"
    texts = []
    for key in keys:
        if key not in record:
            return None, "", f"missing key '{key}'"
        text = record[key]
        if not isinstance(text, str):
            return None, "", f"'{key}' is {type(text).__name__}, not a string"
        if not text or text.isspace():
            return None, "", f"empty '{key}'"
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone \ud800-style escape is valid JSON but not encodable text
                return None, "", (f"'{key}' is not valid Unicode (lone surrogate U+{ord(text[exc.start]):04X} at "
                                  f"character {exc.start})")
        texts.append(text)
    return texts, set_name(record.get("meta")), None


def set_name(meta) -> str:
    """meta.redpajama_set_name, whether meta is a dict or a JSON string; 'unknown' when absent."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return "unknown"
    name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return str(name) if name else "unknown"


@dataclass
class ChunkResult:
    tokens: np.ndarray  # all kept documents back to back (EOD appended when asked)
    lengths: np.ndarray
    docs: list[tuple[int, str, int]]  # (line, set name, key index) per document, in order
    errors: list[tuple[int, str]]
    text_sizes: list[int]  # UTF-8 bytes of each document's text
    last_line: int
    position: int  # input bytes consumed after this chunk
    damage: tuple[int, str] | None  # (line, reason): the input cannot be read from this line on


_WORKER: dict = {}


def _init_worker(tokenizer: str | Tokenizer, keys: list[str], append_eod: bool, dtype: str) -> None:
    """Worker processes get the tokenizer's spec and build their own; inline runs pass the built one."""
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    _WORKER.update(tokenizer=tok, keys=keys, eod=append_eod, dtype=np.dtype(dtype))


def _process_chunk(chunk: list[tuple[int, object]], position: int) -> ChunkResult:
    tok: Tokenizer = _WORKER["tokenizer"]
    keys = _WORKER["keys"]
    texts, docs, errors, text_sizes, damage = [], [], [], [], None
    for number, payload in chunk:
        if isinstance(payload, Damage):
            damage = number, payload.reason
            continue
        if isinstance(payload, bytes) and not payload.strip():
            continue  # blank line between records
        parsed, name, error = parse_record(payload, keys)
        if error:
            errors.append((number, error))
            continue
        for k, text in enumerate(parsed):
            texts.append(text)
            docs.append((number, name, k))
            text_sizes.append(len(text) if text.isascii() else len(text.encode("utf-8")))
    flat, lengths = tok.encode_flat(texts) if texts else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if _WORKER["eod"]:
        flat, lengths = np.insert(flat, np.cumsum(lengths), tok.eod), lengths + 1
    return ChunkResult(flat.astype(_WORKER["dtype"]), lengths, docs, errors, text_sizes, chunk[-1][0] if chunk else 0,
                       position, damage)


# --------------------------------------------------------------------------- main process


def _chunks(records: Iterator[tuple[int, object, int]], chunk_bytes: int):
    chunk, size, position = [], 0, 0
    for number, payload, position in records:
        chunk.append((number, payload))
        if isinstance(payload, bytes):
            size += len(payload)
        elif isinstance(payload, dict):
            size += sum(len(v) for v in payload.values() if isinstance(v, str))
        if size >= chunk_bytes:
            yield chunk, position
            chunk, size = [], 0
    if chunk:
        yield chunk, position


def _results(chunks, executor, window: int) -> Iterator[ChunkResult]:
    """Chunk results in input order, with at most `window` chunks in flight (bounded memory)."""
    if executor is None:
        for chunk, position in chunks:
            yield _process_chunk(chunk, position)
        return
    pending: collections.deque = collections.deque()
    for chunk, position in chunks:
        pending.append(executor.submit(_process_chunk, chunk, position))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-") or "unknown"


def output_prefix(opts: Options, split: str | None, set_name: str, key: str) -> str:
    """`{prefix}[_{split}][_{set}]_{key}_document`: the name says what the dataset holds."""
    parts = [opts.output_prefix] + ([split] if split else []) + ([_safe(set_name)] if opts.split_by_set else [])
    return "_".join(parts + [_safe(key), "document"])


class Run:
    """One invocation: owns the writers, the counters, the skipped-line report and the resume state."""

    def __init__(self, opts: Options, tok: Tokenizer, files: list[InputFile]):
        self.opts, self.tok, self.files = opts, tok, files
        self.dtype = dtype_for_vocab(tok.vocab_size)
        base = Path(opts.output_prefix)
        base.parent.mkdir(parents=True, exist_ok=True)
        self.state_path = base.with_name(base.name + ".preprocess_state.json")
        self.report_path = base.with_name(base.name + "_skipped.tsv")
        self.summary_path = base.with_name(base.name + "_summary.json")
        self.settings = {"version": STATE_VERSION, "tokenizer": tok.fingerprint(), "keys": opts.keys,
                         "append_eod": opts.append_eod, "split_by_set": opts.split_by_set,
                         "dtype": str(self.dtype), "inputs": [f.name for f in files]}
        self.fingerprints = [f.fingerprint() for f in files]
        self.warnings: list[str] = []
        self.writers: dict[str, IndexedDatasetWriter] = {}
        self.stats = {"documents": 0, "tokens": 0, "text_bytes": 0, "per_set": {}, "skipped": {}, "outputs": {},
                      "damaged_inputs": [], "runs": 0}
        self.file_index, self.line, self.report_bytes = 0, 0, 0
        self.resumed = self._load_state()
        self.kept_documents = self.stats["documents"] if self.resumed else None  # at the last checkpoint
        self.report = open(self.report_path, "r+b" if self.resumed else "wb")
        self.report.truncate(self.report_bytes)
        self.report.seek(self.report_bytes)

    def _load_state(self) -> bool:
        if not self.state_path.is_file() or self.opts.overwrite:
            return False
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError:
            raise PreprocessError(f"{self.state_path}: unreadable resume state; delete it (and the *.tmp files next "
                                  "to it) or pass --overwrite to start over") from None
        if state.get("settings") != self.settings:
            raise PreprocessError(
                f"{self.state_path}: an unfinished run with different inputs or settings wrote here (the input "
                "files, tokenizer, keys, EOD or split-by-set differ); re-run the original command to finish it, or "
                "pass --overwrite to start over")
        self.file_index, self.line, self.report_bytes = state["file_index"], state["line"], state["report_bytes"]
        for i, (old, new) in enumerate(zip(state["fingerprints"], self.fingerprints)):
            if old != new and i < self.file_index:
                raise PreprocessError(f"{new[0]}: changed since it was processed by the unfinished run in "
                                      f"{self.state_path}; pass --overwrite to start over")
            if old != new and i == self.file_index:
                self.warnings.append(f"{new[0]} changed since the last checkpoint (fixed a bad line?); continuing "
                                     f"after its line {self.line}")
        self.stats = state["stats"]
        for name, (tokens, documents) in state["writers"].items():
            self.writers[name] = IndexedDatasetWriter(name, self.dtype, resume=(tokens, documents))
        return True

    def checkpoint(self, file_index: int, line: int) -> None:
        state = {"settings": self.settings, "fingerprints": self.fingerprints, "file_index": file_index, "line": line,
                 "writers": {name: w.checkpoint() for name, w in self.writers.items()},
                 "report_bytes": self._flush_report(), "stats": self.stats}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)
        self.kept_documents = self.stats["documents"]

    def kept(self) -> str:
        """What a failure now leaves for the re-run, for the error message."""
        if self.kept_documents is None:
            return "nothing is kept yet (re-running starts over)"
        return f"the {self.kept_documents:,} documents up to the last checkpoint are kept"

    def _flush_report(self) -> int:
        self.report.flush()
        os.fsync(self.report.fileno())
        return self.report.tell()

    def write(self, f: InputFile, r: ChunkResult, until_line: int | None = None) -> None:
        """Route a chunk's documents to their outputs (only lines before `until_line` when given)."""
        keep = len(r.docs) if until_line is None else sum(1 for d in r.docs if d[0] < until_line)
        offsets = np.zeros(len(r.lengths) + 1, dtype=np.int64)
        np.cumsum(r.lengths, out=offsets[1:])
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, (_, name, key) in enumerate(r.docs[:keep]):
            groups[output_prefix(self.opts, f.split, name, self.opts.keys[key])].append(i)
            per_set = self.stats["per_set"].setdefault(name, {"documents": 0, "tokens": 0})
            per_set["documents"] += 1
            per_set["tokens"] += int(r.lengths[i])
        for prefix, idx in groups.items():
            if prefix not in self.writers:
                if any(p.exists() for p in paths(prefix)) and not self.opts.overwrite:
                    raise PreprocessError(f"{paths(prefix)[0]}: already exists; choose another --output-prefix or "
                                          "pass --overwrite")
                self.writers[prefix] = IndexedDatasetWriter(prefix, self.dtype)
            idx = np.asarray(idx)
            contiguous = np.all(np.diff(idx) == 1)
            tokens = (r.tokens[offsets[idx[0]]:offsets[idx[-1] + 1]] if contiguous
                      else np.concatenate([r.tokens[offsets[i]:offsets[i + 1]] for i in idx]))
            self.writers[prefix].add_documents(tokens, r.lengths[idx])
            out = self.stats["outputs"].setdefault(prefix, {"documents": 0, "tokens": 0, "max_token_id": -1})
            out["documents"] += len(idx)
            out["tokens"] += int(r.lengths[idx].sum())
            out["max_token_id"] = max(out["max_token_id"], int(tokens.max()) if len(tokens) else -1)
        self.stats["documents"] += keep
        self.stats["tokens"] += int(offsets[keep])
        self.stats["text_bytes"] += sum(r.text_sizes[:keep])
        for line, reason in r.errors:
            if until_line is not None and line >= until_line:
                break
            self.skip(f, line, reason)
        if r.damage and until_line is None:
            line, reason = r.damage
            self.stats["damaged_inputs"].append({"file": f.name, "line": line, "reason": reason})
            self._report(f, line, reason)

    def skip(self, f: InputFile, line: int, reason: str) -> None:
        kind = reason.split(" (")[0]
        self.stats["skipped"][kind] = self.stats["skipped"].get(kind, 0) + 1
        self._report(f, line, reason)

    def _report(self, f: InputFile, line: int, reason: str) -> None:
        self.report.write(f"{f.name}\t{line}\t{reason}\n".encode())

    def finalize(self, seconds: float, before: dict) -> dict:
        self.stats["this_run"] = {"seconds": seconds, **{k: self.stats[k] - before[k]
                                                          for k in ("documents", "tokens", "text_bytes")}}
        for w in self.writers.values():  # everything that needs disk space before any final name appears,
            w.prepare()                    # so that a failure here (disk full) leaves the run resumable
        self.summary_path.write_text(json.dumps(self.stats, indent=1))
        self.report.close()
        for prefix, w in self.writers.items():
            w.finalize()  # then record the largest id where training's vocabulary check looks, sparing it a scan
            IndexedDataset(prefix).remember_max_token_id(self.stats["outputs"][prefix]["max_token_id"])
        if not self.stats["skipped"] and not self.stats["damaged_inputs"]:
            self.report_path.unlink()
        self.state_path.unlink(missing_ok=True)
        return self.stats

    def close(self) -> None:
        """Release the files after a failure; data that cannot be flushed now lies past the last checkpoint."""
        for w in self.writers.values():
            w.close()
        with contextlib.suppress(OSError):
            self.report.close()


def _os_problem(exc: OSError, prefix: str, kept: str | None) -> str:
    """One line for a failed read or write: the path, the cause, and what to do; `kept` says what a re-run
    continues from (None: the run failed while setting up, before anything was written)."""
    path = exc.filename or Path(prefix).resolve().parent  # a failed write() names no file
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return (f"{path}: not a directory, but --output-prefix {prefix} needs it to be one; remove the file in the "
                "way or choose another --output-prefix")
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = f"the disk is full ({exc.strerror}) while writing the outputs of {prefix}" if full else exc.strerror
    if kept is None:
        return f"{path}: {cause}; " + ("free some space and re-run" if full else
                                       f"--output-prefix {prefix} must be in a folder you can write to")
    return (f"{path}: {cause}; {kept}. " + ("Free some space" if full else "Fix that")
            + " and re-run the same command: it continues from the last checkpoint")


def preprocess(opts: Options, log=print) -> dict:
    """Run (or resume) preprocessing; returns the summary counters."""
    tok = build_tokenizer(opts.tokenizer)
    files = discover(opts.inputs)
    try:
        run = Run(opts, tok, files)
    except OSError as exc:
        raise PreprocessError(_os_problem(exc, opts.output_prefix, None)) from None
    run.stats["runs"] += 1
    if run.resumed:
        log(f"resuming from {run.state_path}: {run.stats['documents']:,} documents done, "
            f"continuing at {files[run.file_index].name if run.file_index < len(files) else 'the end'}"
            f"{f' line {run.line + 1}' if run.line else ''}")
        for warning in run.warnings:
            log(f"warning: {warning}")
    executor = None
    if opts.workers > 1:
        executor = concurrent.futures.ProcessPoolExecutor(
            opts.workers, initializer=_init_worker,
            initargs=(opts.tokenizer, opts.keys, opts.append_eod, str(run.dtype)))
    else:
        _init_worker(tok, opts.keys, opts.append_eod, str(run.dtype))
    progress = _Progress(files, run.file_index, opts.progress)
    before = {k: run.stats[k] for k in ("documents", "tokens", "text_bytes")}
    started = time.perf_counter()
    last_checkpoint = started
    try:
        for fi in range(run.file_index, len(files)):
            f = files[fi]
            first = run.line if fi == run.file_index else 0
            chunks = _chunks(read_records(f, opts.keys, start=first), opts.chunk_bytes)
            for r in _results(chunks, executor, window=2 * opts.workers):
                if opts.strict and (r.errors or r.damage):
                    line, reason = r.errors[0] if r.errors else r.damage
                    run.write(f, r, until_line=line)
                    run.checkpoint(fi, line - 1)
                    fix = ("Fix or remove the line, or run without --strict to skip bad lines," if r.errors else
                           "Replace the file with an intact copy, or run without --strict to keep what can be read,")
                    raise PreprocessError(f"{f.name}:{line}: {reason}. Stopped (--strict); everything before this "
                                          f"line is kept. {fix} and re-run the same command to continue")
                run.write(f, r)
                progress.update(fi, r.position, run.stats, before, started)
                if time.perf_counter() - last_checkpoint >= opts.checkpoint_seconds:
                    run.checkpoint(fi, r.last_line)
                    last_checkpoint = time.perf_counter()
            run.checkpoint(fi + 1, 0)
        progress.close()
        return run.finalize(time.perf_counter() - started, before)
    except BaseException as exc:
        progress.close()
        run.close()
        if isinstance(exc, OSError):
            raise PreprocessError(_os_problem(exc, opts.output_prefix, run.kept())) from None
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """tqdm over input bytes on disk, with documents/s and text MB/s of this invocation."""

    def __init__(self, files: list[InputFile], done_files: int, enabled: bool):
        from tqdm import tqdm

        self.base = [sum(f.size for f in files[:i]) for i in range(len(files) + 1)]
        self.bar = tqdm(total=self.base[-1], initial=self.base[min(done_files, len(files))], unit="B",
                        unit_scale=True, unit_divisor=1024, disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True, desc="preprocess", mininterval=1.0)

    def update(self, fi: int, position: int, stats: dict, before: dict, started: float):
        self.bar.update(max(0, self.base[fi] + position - self.bar.n))
        elapsed = max(time.perf_counter() - started, 1e-9)
        self.bar.set_postfix_str(f"{(stats['documents'] - before['documents']) / elapsed:,.0f} docs/s, "
                                 f"{(stats['text_bytes'] - before['text_bytes']) / elapsed / 1e6:.1f} MB/s",
                                 refresh=False)

    def close(self):
        self.bar.close()


def format_summary(stats: dict, report_path: Path | None = None) -> str:
    run = stats["this_run"]
    secs = max(run["seconds"], 1e-9)
    lines = [f"documents {stats['documents']:,}   tokens {stats['tokens']:,}   text {stats['text_bytes'] / 1e6:,.2f} MB"]
    lines.append(f"this run: {run['documents']:,} documents in {secs:.1f} s ({run['documents'] / secs:,.0f} docs/s, "
                 f"{run['text_bytes'] / secs / 1e6:.1f} MB/s, {run['tokens'] / secs / 1e6:.2f} M tokens/s)"
                 + (f"; continued {stats['runs'] - 1} interrupted run(s)" if stats["runs"] > 1 else ""))
    lines.append("tokens per set: " + ", ".join(f"{k} {v['tokens']:,} ({v['documents']:,} docs)"
                                                 for k, v in sorted(stats["per_set"].items())))
    for prefix, out in sorted(stats["outputs"].items()):
        lines.append(f"  {prefix}.bin/.idx: {out['documents']:,} documents, {out['tokens']:,} tokens")
    skipped = sum(stats["skipped"].values())
    lines.append(f"skipped {skipped:,} lines" + (": " + ", ".join(f"{k} {v:,}" for k, v in stats["skipped"].items())
                                                 + f" (file:line list in {report_path})" if skipped else ""))
    for d in stats["damaged_inputs"]:
        lines.append(f"damaged input: {d['file']}: {d['reason']}; its lines before line {d['line']:,} are kept, the "
                     "rest of it is missing from the outputs (replace it with an intact copy and re-run with "
                     "--overwrite to include it)")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    from .indexed import DataError
    from .sources import InputError

    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenise SlimPajama-style corpora into Megatron-compatible .bin/.idx datasets (one per split, "
                    "optionally per set name). Re-running the same command after an interruption continues it. "
                    "Exit status: 0 done; 1 stopped by an error (the message says what to do); "
                    f"{EXIT_DAMAGED_INPUT} finished, but some compressed inputs were cut short or corrupt: the outputs "
                    "hold everything that could be read (see 'damaged input' in the summary and the skipped list).")
    parser.add_argument("--input", nargs="+", required=True,
                        help="folders (searched recursively for *.jsonl, *.jsonl.zst, *.jsonl.gz, *.parquet), files, "
                             "or saved Hugging Face datasets directories")
    parser.add_argument("--output-prefix", required=True, help="outputs are {prefix}[_{split}][_{set}]_{key}_document")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 (shipped GPT-2 BPE), a sentencepiece .model, "
                                                           "or a HF tokenizer.json")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="text field(s); one output per key")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the end-of-document token to every document (default on)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--split-by-set", action="store_true", help="one output per meta.redpajama_set_name")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs / an unfinished run")
    parser.add_argument("--checkpoint-seconds", type=float, default=30.0, help="how often progress is made resumable")
    parser.add_argument("--chunk-kb", type=int, default=1024, help="input text per work item sent to a worker")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    opts = Options(inputs=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer,
                   keys=args.json_keys, append_eod=args.append_eod, workers=max(1, args.workers),
                   split_by_set=args.split_by_set, strict=args.strict, overwrite=args.overwrite,
                   checkpoint_seconds=args.checkpoint_seconds, chunk_bytes=args.chunk_kb << 10,
                   progress=not args.no_progress)
    try:
        stats = preprocess(opts)
    except (PreprocessError, InputError, DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    base = Path(opts.output_prefix)
    print(format_summary(stats, base.with_name(base.name + "_skipped.tsv")))
    return EXIT_DAMAGED_INPUT if stats["damaged_inputs"] else 0
