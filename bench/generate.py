#!/usr/bin/env python3
"""KV-cached greedy generation, megaqkv against Hugging Face transformers on the same weights, 300M shape on CPU (by hand).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python bench/generate.py [--presets qkv kv qmqa] [--dtypes fp32 bf16]
        [--batch 1] [--prompt-tokens 1984] [--new-tokens 64] [--repeats 3] [--seed 0]

For each preset, random weights (every canonical tensor ~ N(0, 0.02), LayerNorm gains and biases included, as
bench/decode.py builds them; 2048 positions) are loaded into megaqkv's `GPT` and exported with the repository's
own `megaqkv.checkpoint.hf.export(kind="gpt2")` to a transformers `GPT2LMHeadModel` (a duplicated GPT-2: shared roles copied
into `c_attn`, grouped K/V heads repeated, so its K/V cache is always the full 16-head one), loaded with
`attn_implementation="sdpa"` in the same dtype. Both generate N = --new-tokens greedy tokens after the same
prompt of --prompt-tokens random token ids (< 50257), repeated --batch times. Threads: torch's default
(OMP_NUM_THREADS from the environment), the same for both.

What is timed (wall clock, medians of --repeats runs after one warm-up run of each; the runs of the two
libraries are interleaved):
- megaqkv: `generate(model, [prompt] * batch, Sampling(max_new_tokens=N), vocab_size=50257)`.
  prefill = its `prefill_seconds`: the forward over the prompt that fills the cache, logits of the last
  position only. decode tok/s = batch * decode_steps / decode_seconds, where decode_steps = N - 1 (the
  one-token forwards) and decode_seconds runs from the end of the prefill to the end: all N argmaxes (the
  first token comes from the prefill's logits) and the N - 1 one-token forwards.
- HF: prefill = `hf.generate(..., max_new_tokens=1)`: the prompt forward (generate sets logits_to_keep=1, so
  it too computes the last position's logits only), plus one argmax and generate's setup; total =
  `hf.generate(input_ids, attention_mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
  use_cache=True)`. decode tok/s = batch * (N - 1) / (median total - median prefill): the N - 1 further
  one-token forwards and their argmaxes. Both calls pass `suppress_tokens` = the 47 padding rows of the
  50304-row vocabulary (ids >= 50257), the counterpart of megaqkv's `vocab_size=50257`; HF's default cache
  (DynamicCache) is used.
Ratios are HF / megaqkv for times and megaqkv / HF for tokens/s, so > 1 means megaqkv is faster.
"tokens equal": whether both produce the same greedy tokens for every sequence, else the first index that
differs (bf16 may legitimately diverge once two logits are within rounding; fp32 should match).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaqkv.checkpoint import hf  # noqa: E402
from megaqkv.checkpoint.consolidated import Consolidated  # noqa: E402
from megaqkv.checkpoint.loading import build_model  # noqa: E402
from megaqkv.model.generation import Sampling, generate  # noqa: E402
from megaqkv.variants import paper_name  # noqa: E402

from common import random_weights  # noqa: E402

VOCAB = 50257  # GPT-2 BPE; the model's 50304 rows past it are padding
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    diffs = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None if len(ra) == len(rb)
                  else min(len(ra), len(rb))) for ra, rb in zip(a, b)]
    diffs = [d for d in diffs if d is not None]
    return min(diffs) if diffs else None


def bench(ck: Consolidated, hf_dir: Path, dtype: torch.dtype, prompt: list[int], args) -> dict:
    from transformers import GPT2LMHeadModel

    model = build_model(ck, dtype=dtype)
    hf_model = GPT2LMHeadModel.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="sdpa").eval()
    n, batch = args.new_tokens, args.batch
    input_ids = torch.tensor([prompt] * batch)
    attention_mask = torch.ones_like(input_ids)
    hf_kwargs = dict(attention_mask=attention_mask, do_sample=False, use_cache=True, pad_token_id=50256,
                     suppress_tokens=list(range(VOCAB, ck.config.vocab_size)))

    def ours():
        return generate(model, [prompt] * batch, Sampling(max_new_tokens=n), vocab_size=VOCAB)

    def theirs(tokens: int):
        start = time.perf_counter()
        out = hf_model.generate(input_ids, max_new_tokens=tokens, min_new_tokens=tokens, **hf_kwargs)
        return time.perf_counter() - start, out[:, input_ids.shape[1]:].tolist()

    ours(), theirs(1), theirs(n)  # warm-up
    prefill, decode, hf_prefill, hf_total = [], [], [], []
    for _ in range(args.repeats):
        g = ours()
        assert g.decode_steps == n - 1 and all(len(t) == n for t in g.tokens), (g.decode_steps, g.tokens)
        prefill.append(g.prefill_seconds)
        decode.append(g.decode_seconds)
        hf_prefill.append(theirs(1)[0])
        seconds, hf_tokens = theirs(n)
        hf_total.append(seconds)
    med = statistics.median
    hf_decode = med(hf_total) - med(hf_prefill)
    out = dict(prefill=med(prefill), hf_prefill=med(hf_prefill), tok_s=batch * (n - 1) / med(decode),
               hf_tok_s=batch * (n - 1) / hf_decode if hf_decode > 0 else float("nan"),
               diff=first_difference(g.tokens, hf_tokens), tokens=g.tokens[0], hf_tokens=hf_tokens[0],
               decode=med(decode), hf_total=med(hf_total))
    del model, hf_model
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["qkv", "kv", "qmqa"])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=1984)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-tokens", action="store_true", help="print both token sequences when they differ")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is over the tokens after the first)")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    positions = max(2048, args.prompt_tokens + args.new_tokens)
    prompt = torch.randint(0, VOCAB, (args.prompt_tokens,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    print(f"300M shape, random N(0, 0.02) weights, {positions} positions, batch {args.batch}, prompt "
          f"{args.prompt_tokens} random tokens, {args.new_tokens} greedy new tokens, median of {args.repeats} "
          f"after 1 warm-up; {torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); "
          f"torch {torch.__version__}, transformers {transformers.__version__} (GPT2LMHeadModel, sdpa)")
    print(f"decode tok/s = batch × {args.new_tokens - 1} tokens after the first / decode seconds; ratios > 1: "
          "megaqkv faster")
    print("\n| preset | dtype | megaqkv prefill s | HF prefill s | ratio HF/megaqkv | megaqkv decode tok/s | "
          "HF decode tok/s | ratio megaqkv/HF | tokens equal |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    notes = []
    started = time.perf_counter()
    for preset in args.presets:
        ck = random_weights(preset, positions, args.seed)
        name = paper_name(ck.config.sharing, ck.config.num_heads, ck.config.kv_heads)
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = hf.export(ck, Path(tmp) / "hf", kind="gpt2", tokenizer="none")
            for dt in args.dtypes:
                r = bench(ck, hf_dir, DTYPES[dt], prompt, args)
                equal = "yes" if r["diff"] is None else f"no (first differs at {r['diff']})"
                print(f"| {preset} ({name}) | {dt} | {r['prefill']:.3f} | {r['hf_prefill']:.3f} | "
                      f"{r['hf_prefill'] / r['prefill']:.2f} | {r['tok_s']:.2f} | {r['hf_tok_s']:.2f} | "
                      f"{r['tok_s'] / r['hf_tok_s']:.2f} | {equal} |", flush=True)
                notes.append(f"{preset} {dt}: megaqkv decode {r['decode']:.3f} s; HF generate({args.new_tokens}) "
                             f"{r['hf_total']:.3f} s - generate(1) {r['hf_prefill']:.3f} s")
                if r["diff"] is not None and args.show_tokens:
                    notes.append(f"  megaqkv {r['tokens']}\n  HF      {r['hf_tokens']}")
        del ck
    print("\nmedian seconds behind the table:\n" + "\n".join(f"- {n}" for n in notes))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
