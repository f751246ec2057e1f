#!/usr/bin/env python3
"""Attention kernels per preset, measured in one run (by hand): training fwd+bwd and cached decoding.

    python bench/attention.py [--presets qkv kv gqa4 mqa qmqa] [--contexts 2048 8192] [--batches 1 8]
                              [--train-seq 2048] [--train-batch 4] [--dtype bf16] [--reps 5] [--skip-train]

300M attention shape (16 heads of 64). Training: causal attention forward + backward from the fused
projection output, every backend that runs here (sdpa, flash, triton), time (median of --reps) and effective
TFLOP/s (causal: 2 products forward, 5 backward, half the square: 3.5·b·h·s²·d·2 FLOPs). Decoding: one new
token per sequence over a cache of C tokens, every path that runs here (two-pass: megaqkv's attention before
its kernels; blocked: the PyTorch path; triton: flash-decoding on CUDA), time per step, cache bytes read per
step (counted from what the path loads: two-pass reads the cache twice for K=V, the others once) and the
achieved bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaqkv.kernels.attention import causal_attention, triton_supports  # noqa: E402
from megaqkv.kernels.columns import Columns  # noqa: E402
from megaqkv.kernels.decode import blocked_attention  # noqa: E402
from megaqkv.kernels.detect import flash_runs_on, triton_runs_on  # noqa: E402
from megaqkv.variants import PRESETS, AttentionLayout, paper_name  # noqa: E402

from common import two_pass_attention  # noqa: E402

HEADS, HEAD_DIM = 16, 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def layout(preset: str) -> AttentionLayout:
    sharing, g = PRESETS[preset]
    return AttentionLayout(sharing, HEADS, g or HEADS, HEAD_DIM)


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of `fn` after two warm-up calls."""
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    probe = torch.empty(1, 1, HEAD_DIM, device=device, dtype=dtype)
    return [name for name in ("sdpa", "flash", "triton")
            if name == "sdpa" or (name == "flash" and flash_runs_on(probe))
            or (name == "triton" and triton_supports(probe, HEAD_DIM, 0.0) is None)]


def bench_training(presets, seq, batch, dtype, device, reps) -> None:
    backends = training_backends(device, dtype)
    flops = 3.5 * batch * HEADS * seq * seq * HEAD_DIM * 2  # causal: half of 7 products of s×s×d
    print(f"\n## Training attention fwd+bwd: batch {batch}, seq {seq}, {HEADS} heads of {HEAD_DIM}, {dtype}")
    print("| variant | " + " | ".join(f"{b}: ms (TFLOP/s)" for b in backends) + " | vs QKV (first backend) |")
    print("|---|" + "---|" * len(backends) + "---|")
    first = {}
    for preset in presets:
        lay = layout(preset)
        src = torch.randn(batch, seq, lay.rows, device=device, dtype=dtype, requires_grad=True)
        up = torch.randn(batch, seq, HEADS, HEAD_DIM, device=device, dtype=dtype)
        cells = []
        for name in backends:
            def step():
                out = causal_attention(src, None, Columns.fused(lay), backend=name)
                out.backward(up)
                src.grad = None
            s = timed(step, reps, device)
            first.setdefault(preset, s)
            cells.append(f"{s * 1e3:.2f} ({flops / s / 1e12:.2f})")
        ratio = first[preset] / first["qkv"] if "qkv" in first else float("nan")
        print(f"| {paper_name(lay.sharing, HEADS, lay.num_kv_heads)} | " + " | ".join(cells) + f" | {ratio:.2f}× |",
              flush=True)


def decode_paths(device: torch.device) -> dict:
    paths = {"two-pass": two_pass_attention, "blocked": blocked_attention}
    if device.type == "cuda" and triton_runs_on(torch.empty(1, device=device)):
        from megaqkv.kernels.triton_decode import triton_decode
        paths["triton"] = lambda q, k, v, valid, start: triton_decode(q[:, 0], k, v, valid, start + 1)
    return paths


def bytes_read(path: str, lay: AttentionLayout, batch: int, length: int, element: int) -> int:
    if path == "triton":  # counted by the kernel's own tile plan
        from megaqkv.kernels.triton_decode import decode_bytes_read
        return decode_bytes_read(batch, lay.num_kv_heads, length, HEAD_DIM, element, lay.kv_shared)
    one = batch * lay.num_kv_heads * length * HEAD_DIM * element
    if path == "two-pass":  # the score pass reads the keys, the value pass the values: K=V read twice
        return 2 * one
    return one * lay.kv_head_tensors()


def bench_decode(presets, contexts, batches, dtype, device, reps, peak_gbs=None) -> None:
    paths = decode_paths(device)
    element = torch.empty(0, dtype=dtype).element_size()
    print(f"\n## Decode attention, one new token per sequence, {HEADS} heads of {HEAD_DIM}, {dtype}")
    print("| variant | batch | context | " + " | ".join(f"{p}: ms (GB read, GB/s)" for p in paths)
          + " | blocked vs two-pass | blocked vs QKV |")
    print("|---|---|---|" + "---|" * len(paths) + "---|---|")
    blocked = {}
    for batch in batches:
        for context in contexts:
            for preset in presets:
                lay = layout(preset)
                # a cache allocated for more tokens than it holds yet, as generation allocates it
                shape = (batch, lay.num_kv_heads, context + 128, HEAD_DIM)
                try:
                    keys = torch.randn(shape, device=device, dtype=dtype)
                    values = keys if lay.kv_shared else torch.randn(shape, device=device, dtype=dtype)
                except torch.OutOfMemoryError:
                    print(f"| {preset} | {batch} | {context} | out of memory |")
                    continue
                valid = torch.ones(batch, context + 128, dtype=torch.bool, device=device)
                q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=device, dtype=dtype)
                cells, times = [], {}
                for name, attend in paths.items():
                    s = timed(lambda: attend(q, keys, values, valid, context), reps, device)
                    times[name] = s
                    gb = bytes_read(name, lay, batch, context + 1, element) / 1e9
                    share = f", {100 * gb / s / peak_gbs:.0f}%" if peak_gbs else ""
                    cells.append(f"{s * 1e3:.2f} ({gb:.3f}, {gb / s:.0f}{share})")
                blocked[preset, batch, context] = times["blocked"]
                vs_qkv = (times["blocked"] / blocked["qkv", batch, context]
                          if ("qkv", batch, context) in blocked else float("nan"))
                print(f"| {paper_name(lay.sharing, HEADS, lay.num_kv_heads)} | {batch} | {context} | "
                      + " | ".join(cells) + f" | {times['blocked'] / times['two-pass']:.2f}× | {vs_qkv:.2f}× |",
                      flush=True)
                del keys, values


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["qkv", "kv", "gqa4", "mqa", "qmqa"], choices=list(PRESETS))
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--train-seq", type=int, default=2048)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--peak-gbs", type=float, help="the device's memory bandwidth: decode GB/s also as %% of it")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# megaqkv attention kernels on {name}, torch {torch.__version__}")
    if not args.skip_train:
        bench_training(args.presets, args.train_seq, args.train_batch, dtype, device, args.reps)
    if not args.skip_decode:
        bench_decode(args.presets, args.contexts, args.batches, dtype, device, args.reps, args.peak_gbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
