#!/usr/bin/env python3
"""Preprocessing throughput and memory, and sample-index build time (run by hand, not in CI).

    python bench/preprocess.py [--corpus ../shared/data/corpus/real.jsonl.zst] [--repeats 3]

Runs tools/preprocess_data.py on the benchmark corpus with 1 and 2 workers (medians of the repeats;
peak memory is the largest summed RSS of the process and its workers, sampled every 20 ms), checks
the output token for token against a direct GPT-2 BPE + EOD tokenisation, compares with
Megatron-LM's figures measured on the same text and machine (../shared/data/README.md), and times
the packed sample index for a synthetic 10B-token, 5M-document dataset.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaqkv.data.gpt_dataset import packed_indices  # noqa: E402
from megaqkv.data.indexed import IndexedDataset  # noqa: E402
from megaqkv.data.tokenizers import build_tokenizer  # noqa: E402

from common import run_measured  # noqa: E402

MEGATRON = {"docs_per_s": (140, 185), "peak_gb": (1.6, 1.9)}  # ../shared/data/README.md, same machine and text


def run_once(corpus: Path, workers: int, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus), "--output-prefix",
           str(out), "--workers", str(workers), "--no-progress", "--overwrite"]
    wall, peak, _ = run_measured(cmd)
    stats = json.loads(out.with_name(out.name + "_summary.json").read_text())
    return {"wall": wall, "peak": peak, **stats}


def check_tokens(corpus: Path, prefix: Path) -> tuple[bool, int]:
    """The .bin/.idx hold exactly GPT-2 BPE of each document followed by EOD 50256."""
    import zstandard

    enc = build_tokenizer("gpt2").encoding
    ds = IndexedDataset(prefix)
    with open(corpus, "rb") as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        i = 0
        for i, line in enumerate(reader):
            if ds[i].tolist() != enc.encode_ordinary(json.loads(line)["text"]) + [50256]:
                return False, i
    return i + 1 == len(ds), i + 1


def sample_index_bench(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    docs, tokens, seq = 5_000_000, 10_000_000_000, 2048
    sizes = rng.integers(1, 2 * tokens // docs, size=docs).astype(np.int32)  # mean ~2000 tokens
    sizes[0] += tokens - int(sizes.sum(dtype=np.int64))  # exactly 10B
    samples = (tokens - 1) // seq
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        doc_idx, sample_idx, shuffle_idx = packed_indices(sizes, seq, samples, seed=1234)
        times.append(time.perf_counter() - start)
    return {"docs": docs, "tokens": int(sizes.sum(dtype=np.int64)), "samples": len(shuffle_idx),
            "seconds": statistics.median(times), "bytes": doc_idx.nbytes + sample_idx.nbytes + shuffle_idx.nbytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "data" / "corpus" / "real.jsonl.zst")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.corpus.is_file():
        print(f"skipped: benchmark corpus {args.corpus} is absent (see ../shared/data/README.md)")
        return 0
    print(f"corpus {args.corpus} ({args.corpus.stat().st_size / 1e6:.1f} MB compressed); medians of {args.repeats}")
    print("| workers | docs/s | MB/s (text) | M tokens/s | wall s | peak memory | vs Megatron docs/s | "
          "vs Megatron memory |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            runs = [run_once(args.corpus, workers, Path(tmp) / f"w{workers}") for _ in range(args.repeats)]
            wall = statistics.median(r["wall"] for r in runs)
            peak = statistics.median(r["peak"] for r in runs)
            docs, text, tokens = runs[0]["documents"], runs[0]["text_bytes"], runs[0]["tokens"]
            speed = docs / wall
            print(f"| {workers} | {speed:,.0f} | {text / wall / 1e6:.1f} | {tokens / wall / 1e6:.2f} | {wall:.2f} | "
                  f"{peak / 2 ** 20:.0f} MiB | {speed / MEGATRON['docs_per_s'][1]:.1f}–"
                  f"{speed / MEGATRON['docs_per_s'][0]:.1f}× faster | "
                  f"{MEGATRON['peak_gb'][0] * 2 ** 30 / peak:.0f}–{MEGATRON['peak_gb'][1] * 2 ** 30 / peak:.0f}× "
                  "less |")
        print("(wall time includes process start-up and loading the tokenizer; Megatron-LM --workers 2: "
              f"{MEGATRON['docs_per_s'][0]}–{MEGATRON['docs_per_s'][1]} docs/s, {MEGATRON['peak_gb'][0]}–"
              f"{MEGATRON['peak_gb'][1]} GB)")
        same, n = check_tokens(args.corpus, Path(tmp) / "w2_text_document")
        print(f"output identical to GPT-2 BPE + EOD for all {n:,} documents: {same}; "
              f"{tokens:,} tokens, .bin {(Path(tmp) / 'w2_text_document.bin').stat().st_size:,} B, "
              f".idx {(Path(tmp) / 'w2_text_document.idx').stat().st_size:,} B")
    s = sample_index_bench(args.repeats)
    print(f"packed sample index, {s['docs']:,} documents / {s['tokens']:,} tokens, seq 2048: {s['samples']:,} samples "
          f"in {s['seconds']:.2f} s (median), {s['bytes'] / 2 ** 20:.0f} MiB of index arrays")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
