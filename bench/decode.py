#!/usr/bin/env python3
"""KV-cached decoding speed and cache memory per variant, 300M shape on CPU, measured in one run (by hand).

    python bench/decode.py [--contexts 512 1024 2048 4096 8192] [--batch 1] [--steps 12] [--budget-gib 4]
                           [--layers N] [--two-pass]

The 300M shape (or its first --layers layers) with 8192 positions, bf16 weights and cache. --two-pass also
times each step with the cached attention megaqkv used before its blocked kernel, in the same run. For each context C the cache is filled to C
tokens (random values: decoding cost does not depend on them) and the time of each further decode step
is measured (median of --steps after 2 warm-up steps). The last table is the largest batch whose cache
fits a fixed memory budget at each context, from the bytes the cache really allocates, checked by
allocating it.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaqkv.config import load_model_config  # noqa: E402
from megaqkv.model import GPT  # noqa: E402
from megaqkv.model.kv_cache import KVCache  # noqa: E402
from megaqkv.model import attention as model_attention  # noqa: E402
from megaqkv.variants import PRESETS, paper_name  # noqa: E402

from common import two_pass_attention  # noqa: E402

DTYPE = torch.bfloat16


def build(preset: str, positions: int, layers: int | None = None) -> GPT:
    cfg = load_model_config(REPO / "model_configs" / f"300M_{preset}.yaml")
    cfg = dataclasses.replace(cfg, max_position_embeddings=positions, hidden_dropout=0.0,
                              num_layers=layers or cfg.num_layers)
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu").to(DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


@torch.no_grad()
def decode_step_seconds(model: GPT, batch: int, context: int, steps: int) -> tuple[float, int]:
    cache = KVCache(model.cfg, batch, context + steps + 2, DTYPE)
    for t in {id(t): t for t in cache.keys + cache.values}.values():
        t.normal_()
    cache.valid[:, :context] = True
    cache.length = context
    cache.real[:] = context
    token = torch.zeros(batch, 1, dtype=torch.long)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        model(token, cache=cache)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times), cache.nbytes


def fits(model_cfg, context: int, budget: int) -> int:
    per_sequence = KVCache(model_cfg, 1, context, DTYPE).nbytes
    batch = budget // per_sequence
    if batch:
        assert KVCache(model_cfg, batch, context, DTYPE).nbytes <= budget  # really allocated
    return batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--budget-gib", type=float, default=4.0)
    p.add_argument("--layers", type=int, help="only the first N layers (default: all 24)")
    p.add_argument("--two-pass", action="store_true", help="also time the pre-kernel two-pass cached attention")
    args = p.parse_args()
    positions = max(args.contexts) + args.steps + 2
    print(f"300M shape ({args.layers or 24} layers), {positions} positions, bf16, batch {args.batch}, "
          f"{torch.get_num_threads()} threads; decode tokens/s = batch / median step time")
    print("\n| variant | attention | KV bytes/token | "
          + " | ".join(f"C={c}: tok/s (cache MiB)" for c in args.contexts) + " |")
    print("|---|---|---|" + "---|" * len(args.contexts))
    paths = {"blocked": model_attention.cached_attention}
    if args.two_pass:
        paths["two-pass"] = two_pass_attention
    seconds = {}
    for preset in args.presets:
        model = build(preset, positions, args.layers)
        name = paper_name(model.cfg.sharing, model.cfg.num_heads, model.cfg.kv_heads)
        per_token = KVCache(model.cfg, 1, 1, DTYPE).nbytes
        for path, attend in paths.items():
            model_attention.cached_attention = attend
            cells = []
            for c in args.contexts:
                step, nbytes = decode_step_seconds(model, args.batch, c, args.steps)
                seconds[preset, path, c] = step
                cells.append(f"{args.batch / step:.1f} ({nbytes / 2 ** 20:.0f})")
            print(f"| {name} | {path} | {per_token:,} | " + " | ".join(cells) + " |", flush=True)
        model_attention.cached_attention = paths["blocked"]
        del model
    if "qkv" in args.presets:
        print("\nstep time relative to QKV's with the same attention, at each context:")
        for path in paths:
            print(f"- {path}: " + "; ".join(
                f"{paper_name(*_shape(pr))} " + ", ".join(
                    f"{seconds[pr, path, c] / seconds['qkv', path, c]:.2f}×" for c in args.contexts)
                for pr in args.presets if pr != "qkv"))
    if args.two_pass:
        print("\nblocked step time relative to two-pass: " + "; ".join(
            f"{paper_name(*_shape(pr))} " + ", ".join(
                f"{seconds[pr, 'blocked', c] / seconds[pr, 'two-pass', c]:.2f}×" for c in args.contexts)
            for pr in args.presets))
    budget = int(args.budget_gib * 2 ** 30)
    print(f"\nLargest batch whose KV cache fits {args.budget_gib:g} GiB (bf16, allocated to check):")
    print("| variant | " + " | ".join(f"C={c}" for c in args.contexts) + " |")
    print("|---|" + "---|" * len(args.contexts))
    for preset in args.presets:
        cfg = dataclasses.replace(load_model_config(REPO / "model_configs" / f"300M_{preset}.yaml"),
                                  max_position_embeddings=positions)
        print(f"| {paper_name(cfg.sharing, cfg.num_heads, cfg.kv_heads)} | "
              + " | ".join(str(fits(cfg, c, budget)) for c in args.contexts) + " |", flush=True)
    return 0


def _shape(preset: str):
    sharing, g = PRESETS[preset]
    return sharing, 16, g or 16


if __name__ == "__main__":
    sys.exit(main())
