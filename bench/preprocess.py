#!/usr/bin/env python3
"""Preprocessing throughput, CPU time and memory, side by side with Megatron-LM's tools; sample-index build time
(run by hand, not in CI).

    python bench/preprocess.py [--corpus ../shared/data/corpus/real.jsonl.zst] [--repeats 3] [--workers 1 2]
                               [--megatron DIR --megatron-python PYTHON]

Every tool reads the same decompressed jsonl and writes GPT-2 BPE + EOD. Without --megatron, megaqkv runs with
gigatoken and without it (tiktoken, as before gigatoken was used). With --megatron (a Megatron-LM checkout;
PYTHON: an interpreter with its requirements and gigatoken) it also runs Megatron's tools/preprocess_data.py
(--workers N) and tools/preprocess_data_fast.py (gigatoken, whose thread pool is limited to N by
RAYON_NUM_THREADS; it has no --workers), both with its HuggingFaceTokenizer on a GPT-2 tokenizer.json written from
the shipped vocabulary (its GPT2BPETokenizer downloads `gpt2` from the Hugging Face hub). Runs alternate between
the tools, repeat after repeat, and the table gives medians with the range: the machine is shared, so CPU time
(user + system of the whole process tree) is the steadier measure and "per core" divides by it. Each run goes
through bench/split_cpu.py, which reports the CPU of the imports and of main() apart; main() on the corpus's first
tenth holds the rest of the fixed cost (tokenizer, worker start-up, a cold word cache), so "MB per CPU-second
after the first tenth" is the other nine tenths' text / (main() - main() on the first tenth): the rate that
matters for a large corpus. Outputs are compared byte for byte, and ours token for token with tiktoken's
encode_ordinary + EOD. Peak memory is the largest summed RSS of the process and its children (20 ms samples).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaqkv.data.gpt_dataset import packed_indices  # noqa: E402
from megaqkv.data.indexed import IndexedDataset  # noqa: E402
from megaqkv.data.tokenizers import GPT2_DIR, build_tokenizer  # noqa: E402

from common import run_measured  # noqa: E402

MEGATRON_REFERENCE = "Megatron-LM preprocess_data.py --workers 2 (../shared/data/README.md): 140–185 docs/s, 1.6–1.9 GB"


@dataclass
class Tool:
    name: str
    workers: int
    python: str
    script: Path
    args: list[str]  # besides --input / --output-prefix
    env: dict

    def command(self, corpus: Path, out: Path) -> list[str]:
        """Run through split_cpu.py, which reports the CPU seconds of the imports and of main() apart."""
        return [self.python, str(REPO / "bench" / "split_cpu.py"), str(self.script), *self.args, "--input",
                str(corpus), "--output-prefix", str(out)]


def decompress(corpus: Path, work: Path) -> Path:
    import zstandard

    plain = work / "corpus.jsonl"
    with open(corpus, "rb") as src, open(plain, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    return plain


def gpt2_tokenizer_dir(work: Path) -> Path:
    """GPT-2 as a Hugging Face tokenizer folder, for Megatron's HuggingFaceTokenizer (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = work / "gpt2-hf"
    folder.mkdir()
    tok = Tokenizer(models.BPE.from_file(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    return folder


def tools(args, work: Path) -> list[Tool]:
    hidden = work / "no-gigatoken"  # an importable gigatoken that fails: megaqkv falls back to tiktoken
    hidden.mkdir()
    (hidden / "gigatoken.py").write_text('raise ImportError("hidden by bench/preprocess.py")\n')
    script, flags = REPO / "tools" / "preprocess_data.py", ["--no-progress", "--overwrite"]
    ours = [Tool("megaqkv", w, sys.executable, script, ["--workers", str(w), *flags],
                 {**os.environ, "PYTHONPATH": str(REPO)}) for w in args.workers]
    if not args.megatron:
        return [t for w, fast in zip(args.workers, ours) for t in (fast, Tool(
            "megaqkv without gigatoken (tiktoken)", w, sys.executable, script, ["--workers", str(w), *flags],
            {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{hidden}"}))]
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(gpt2_tokenizer_dir(work)),
          "--append-eod"]
    env = {**os.environ, "PYTHONPATH": str(args.megatron), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    python, folder = str(args.megatron_python), args.megatron / "tools"
    old = [Tool("Megatron preprocess_data.py", w, python, folder / "preprocess_data.py", [*hf, "--workers", str(w)],
                env) for w in args.workers]
    fast = [Tool("Megatron preprocess_data_fast.py", w, python, folder / "preprocess_data_fast.py",
                 [*hf, "--use-gigatoken"], {**env, "RAYON_NUM_THREADS": str(w)}) for w in args.workers]
    return [t for trio in zip(ours, old, fast) for t in trio]


def measure(tool: Tool, corpus: Path, out: Path) -> dict:
    m = run_measured(tool.command(corpus, out), tool.env)
    split = json.loads(m.stdout.strip().splitlines()[-1])
    return {"wall": m.wall, "cpu": m.cpu, "peak": m.peak / 2 ** 20, **split}


def digest(prefix: Path) -> str:
    return hashlib.sha256(Path(f"{prefix}.bin").read_bytes() + Path(f"{prefix}.idx").read_bytes()).hexdigest()


def check_tokens(corpus: Path, prefix: Path) -> tuple[bool, int]:
    """The .bin/.idx hold exactly tiktoken's GPT-2 BPE (encode_ordinary) of each document followed by EOD 50256."""
    enc = build_tokenizer("gpt2").encoding
    ds = IndexedDataset(prefix)
    i = -1
    with open(corpus, encoding="utf-8") as lines:
        for i, line in enumerate(lines):
            if ds[i].tolist() != enc.encode_ordinary(json.loads(line)["text"]) + [50256]:
                return False, i
    return i + 1 == len(ds), i + 1


def median_range(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def compare(args, work: Path) -> bool:
    corpus = decompress(args.corpus, work)
    head = work / "head.jsonl"  # the first tenth of the corpus: every tool's start-up and warm-up, workers started
    docs, text, head_text = 0, 0, 0
    with open(corpus, "rb") as f, open(head, "wb") as out:
        for line in f:
            if out.tell() < corpus.stat().st_size // 10:
                out.write(line)
                head_text += len(json.loads(line)["text"].encode("utf-8"))
            docs, text = docs + 1, text + len(json.loads(line)["text"].encode("utf-8"))
    runs: dict[int, dict] = {}
    all_tools = tools(args, work)
    for rep in range(args.repeats):
        for k, tool in enumerate(all_tools):
            full = measure(tool, corpus, work / f"t{k}")
            small = measure(tool, head, work / f"s{k}")
            r = runs.setdefault(k, {"wall": [], "cpu": [], "peak": [], "import_cpu": [], "run_cpu": [], "setup_cpu": []})
            for key in ("wall", "cpu", "peak", "import_cpu", "run_cpu"):
                r[key].append(full[key])
            r["setup_cpu"].append(small["run_cpu"])
            r["digest"] = digest(work / f"t{k}_text_document")
            print(f"  repeat {rep + 1}: {tool.name} --workers {tool.workers}: wall {full['wall']:.2f} s, CPU "
                  f"{full['cpu']:.2f} s (imports {full['import_cpu']:.2f}, main {full['run_cpu']:.2f}; main on the first "
                  f"tenth {small['run_cpu']:.2f}), peak {full['peak']:.0f} MiB", file=sys.stderr)
    same, n = check_tokens(corpus, work / "t0_text_document")
    reference = runs[0]["digest"]
    mb = text / 1e6
    print(f"corpus {args.corpus}: {docs:,} documents, {mb:.2f} MB of text; medians of {args.repeats} (range), "
          f"load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores")
    print("| tool | workers | docs/s | MB/s | wall s | CPU s | MB per CPU-second | CPU s: imports | CPU s: main() | "
          "CPU s: main() on the first tenth | MB per CPU-second after the first tenth | peak memory MiB | output |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, tool in enumerate(all_tools):
        r = runs[k]
        wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
        work_cpu = statistics.median(r["run_cpu"]) - statistics.median(r["setup_cpu"])
        print(f"| {tool.name} | {tool.workers} | {docs / wall:,.0f} | {mb / wall:.1f} | {median_range(r['wall'], '.2f')} "
              f"| {median_range(r['cpu'], '.2f')} | {mb / cpu:.1f} | {median_range(r['import_cpu'], '.2f')} | "
              f"{median_range(r['run_cpu'], '.2f')} | {median_range(r['setup_cpu'], '.2f')} | "
              f"{(text - head_text) / 1e6 / max(work_cpu, 1e-9):.1f} | {median_range(r['peak'], '.0f')} | "
              f"{'identical' if r['digest'] == reference else 'DIFFERENT'} |")
    if not args.megatron:
        print(f"({MEGATRON_REFERENCE}; pass --megatron to measure Megatron-LM's tools here instead of megaqkv "
              "without gigatoken)")
    print(f"megaqkv's output equals tiktoken GPT-2 BPE + EOD for all {n:,} documents: {same}; "
          f".bin {Path(work / 't0_text_document.bin').stat().st_size:,} B, "
          f".idx {Path(work / 't0_text_document.idx').stat().st_size:,} B")
    return same and all(r["digest"] == reference for r in runs.values())


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
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--megatron", type=Path, help="a Megatron-LM checkout (its tools/ and megatron/)")
    parser.add_argument("--megatron-python", type=Path, help="Python for Megatron-LM's tools (default: this one)",
                        default=Path(sys.executable))
    parser.add_argument("--skip-sample-index", action="store_true")
    args = parser.parse_args()
    if not args.corpus.is_file():
        print(f"skipped: benchmark corpus {args.corpus} is absent (see ../shared/data/README.md)")
        return 0
    if args.megatron and not (args.megatron / "tools" / "preprocess_data_fast.py").is_file():
        parser.error(f"--megatron {args.megatron}: no tools/preprocess_data_fast.py there")
    with tempfile.TemporaryDirectory() as tmp:
        ok = compare(args, Path(tmp))
    if not args.skip_sample_index:
        s = sample_index_bench(args.repeats)
        print(f"packed sample index, {s['docs']:,} documents / {s['tokens']:,} tokens, seq 2048: {s['samples']:,} "
              f"samples in {s['seconds']:.2f} s (median), {s['bytes'] / 2 ** 20:.0f} MiB of index arrays")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
