#!/usr/bin/env python3
"""Hugging Face decoding at a long context: megaqkv's native export vs its GPT-2 export, 300M shape on CPU (by hand).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python bench/hf_decode.py [--presets qkv kv qmqa] [--batch 2]
        [--prompt-tokens 1920] [--new-tokens 64] [--repeats 3] [--seed 0]

Per preset, random 300M-shaped weights (`common.random_weights`, fp32) are exported by the repository's own
converter twice: `--to hf` (the native model: per-role weights, a cache of one tensor per layer for K=V and
num_kv_heads heads) and `--to hf-gpt2` (GPT2LMHeadModel: shared roles copied, KV heads repeated). Each
run is a process of its own, so its peak memory is its own: `AutoModelForCausalLM` (`attn_implementation=
"sdpa"`, fp32) generates N = --new-tokens greedy tokens after the same prompt of --prompt-tokens random ids,
--batch times, with transformers' default dynamic cache. Each export runs --repeats times, the two
interleaved so that drift in the machine's speed hits both alike; the table shows medians. The dynamic
cache grows by `torch.cat` every step, so on CPU decode speed depends on whether glibc hands the freed
cache back to the kernel (fresh pages faulted in every step) or reuses it; `--malloc-fixed` fixes its
thresholds so that it reuses.

Timing: a logits processor stamps the clock at every step (the first stamp comes after the prompt's
forward). prefill s = first stamp - the call; decode tok/s = batch / the median interval between stamps
(one one-token forward each; the mean over all N - 1 is printed too). One warm-up generate of 2 tokens
precedes the measured one.
Memory: "cache" = bytes of the distinct tensors the cache holds after generating (a tensor that is key and
value counts once); "peak RSS" = the process's peak resident memory sampled every 20 ms over both generate
calls, and "over the model" = that peak minus the resident memory once the model is loaded and has run one
token (activations and cache).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import random_weights, tree_rss  # noqa: E402

VOCAB = 50257


def child(args) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessor

    import megaqkv  # noqa: F401  (registers the native model: no remote code needed)

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(os.getpid()))
            time.sleep(0.02)

    model = AutoModelForCausalLM.from_pretrained(args.child, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(0, VOCAB, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.repeat(args.batch, 1)
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                  suppress_tokens=list(range(VOCAB, model.config.vocab_size)), return_dict_in_generate=True)
    with torch.no_grad():
        model(ids[:1, :1])  # every weight paged in (safetensors are mapped lazily) before the baseline
    loaded = tree_rss(os.getpid())
    sampler = threading.Thread(target=sample)
    sampler.start()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
        stamps.clear()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             logits_processor=[Stamp()], **kwargs)
        stop.set()
        sampler.join()
    storages = {}
    for layer in out.cache.layers:
        for t in (layer.keys, layer.values):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"model": type(model).__name__, "prefill": stamps[0] - start,
                      "tok_s": args.batch / statistics.median(steps), "mean_tok_s": args.batch / statistics.mean(steps),
                      "cache": sum(storages.values()), "cached_tokens": out.cache.get_seq_length(),
                      "peak": peak[0], "over_model": peak[0] - loaded,
                      "tokens": out.sequences[0, ids.shape[1]:].tolist()}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["qkv", "kv", "qmqa"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=1920)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each export (medians are reported)")
    p.add_argument("--malloc-fixed", action="store_true",
                   help="run the children with glibc's mmap/trim thresholds fixed high, so that transformers' "
                        "per-step torch.cat of the cache reuses freed memory instead of faulting in fresh pages")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is over the tokens after the first)")
    import subprocess

    import transformers

    from megaqkv.checkpoint import hf
    from megaqkv.variants import kv_cache_bytes_per_token, paper_name

    transformers.logging.disable_progress_bar()
    positions = max(2048, args.prompt_tokens + args.new_tokens)
    print(f"300M shape (20 layers, hidden 1024, 16 heads of 64), random weights, fp32, sdpa; batch {args.batch}, "
          f"prompt {args.prompt_tokens} random tokens, {args.new_tokens} greedy new tokens; "
          f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); "
          f"{'glibc thresholds fixed' if args.malloc_fixed else 'default allocator settings'}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    print("\n| preset | export | HF class | prefill s | decode tok/s (mean) | cache (MiB) | cache formula (MiB) | "
          "peak RSS (GiB) | over the model (GiB) | vs GPT-2 export: tok/s, cache, over the model |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
                            if args.malloc_fixed else {})}
    started = time.perf_counter()
    for preset in args.presets:
        ck = random_weights(preset, positions, args.seed)
        name = paper_name(ck.config.sharing, ck.config.num_heads, ck.config.kv_heads)
        rows = {}
        with tempfile.TemporaryDirectory() as tmp:
            paths = {kind: hf.export(ck, Path(tmp) / kind, kind=kind, tokenizer="none") for kind in ("gpt2", "native")}
            runs = {kind: [] for kind in paths}
            for _ in range(args.repeats):
                for kind, path in paths.items():
                    cmd = [sys.executable, __file__, "--child", str(path), "--batch", str(args.batch),
                           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                           "--seed", str(args.seed)]
                    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if run.returncode:
                        raise SystemExit(f"{preset} {kind} failed:\n{run.stderr[-3000:]}")
                    runs[kind].append(json.loads(run.stdout.strip().splitlines()[-1]))
            rows = {kind: {key: statistics.median(r[key] for r in rs) if key not in ("model", "tokens") else rs[0][key]
                           for key in rs[0]} for kind, rs in runs.items()}
            for kind, r in rows.items():
                per_token = kv_cache_bytes_per_token(ck.config, 4) if kind == "native" else \
                    ck.config.num_layers * 2 * ck.config.hidden_size * 4
                formula = args.batch * r["cached_tokens"] * per_token
                vs = "" if kind == "gpt2" else (
                    f"{r['tok_s'] / rows['gpt2']['tok_s']:.2f}×, {r['cache'] / rows['gpt2']['cache']:.4f}×, "
                    f"{r['over_model'] / rows['gpt2']['over_model']:.2f}×"
                    + ("" if r["tokens"] == rows["gpt2"]["tokens"] else "; tokens differ"))
                print(f"| {preset} ({name}) | {kind} | {r['model']} | {r['prefill']:.2f} | {r['tok_s']:.2f} "
                      f"({r['mean_tok_s']:.2f}) | {r['cache'] / 2**20:.1f} | {formula / 2**20:.1f} | "
                      f"{r['peak'] / 2**30:.2f} | {r['over_model'] / 2**30:.2f} | {vs} |", flush=True)
        del ck
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
