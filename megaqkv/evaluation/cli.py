"""tools/evaluate.py and tools/generate.py: thin command lines over perplexity, lm-eval and generation.

    evaluate.py --checkpoint PATH --data PREFIX [--split valid --split-ratios 969 30 1] [--tokens N]
                [--seq-length 2048] [--batch-size 8] [--dtype fp32|bf16] [--device cpu|cuda]
                [--paper-compatible] [--json OUT]
    evaluate.py --checkpoint PATH --tasks hellaswag,piqa,arc_easy,arc_challenge,winogrande --num-fewshot 5
    generate.py --checkpoint PATH --prompt TEXT [--prompt ...] [--max-new-tokens 64] [--temperature 0]
                [--top-k 0] [--top-p 1] [--stop STRING ...] [--seed 0] [--tp N under torchrun]

A checkpoint is any format tools/convert_ckpt.py reads (DeepSpeed, consolidated, paper, HF export).
Under torchrun, evaluate.py splits the samples over the processes (data parallel) and generate.py
splits the heads (--tp, each rank caching its own).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..checkpoint.consolidated import CheckpointError, variant_text
from ..config import ConfigError
from ..arguments import POSITIVE, checked
from ..data.indexed import DataError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _distributed(tp: int = 1):
    """(rank, ProcessGrid or None) when launched by torchrun/deepspeed with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, None
    from ..parallel import ProcessGrid, init_distributed

    init_distributed()
    grid = ProcessGrid(tp, 1)
    return grid.rank, grid


def _checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="DeepSpeed, consolidated, paper (.pt) or HF directory")
    p.add_argument("--format", choices=["deepspeed", "consolidated", "paper", "hf"], help="default: detected")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", help="gpt2, a sentencepiece .model or a HF tokenizer.json (default: the one the "
                                       "checkpoint records, else gpt2)")


def _tokenizer_spec(args, ck) -> str:
    from ..data.tokenizers import checkpoint_tokenizer

    return checkpoint_tokenizer(args.tokenizer, (ck.trainer or {}).get("tokenizer"))


def evaluate_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py", description="Validation perplexity and lm-eval tasks.")
    _checkpoint_arguments(p)
    p.add_argument("--data", nargs="+", help="indexed dataset prefixes (made by tools/preprocess_data.py)")
    p.add_argument("--split", choices=["all", "train", "valid", "test"], default="all",
                   help="which share of each prefix's documents (by --split-ratios); default: all of it")
    p.add_argument("--split-ratios", type=float, nargs=3, default=[969.0, 30.0, 1.0])
    p.add_argument("--tokens", type=POSITIVE, help="evaluate this many predicted tokens per prefix (default: all)")
    p.add_argument("--seq-length", type=POSITIVE, help="default: the model's positions")
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--paper-compatible", action="store_true",
                   help="one document per sample, padded; report the loss with and without the padding scored")
    p.add_argument("--pad-id", type=int, help="padding token for --paper-compatible (default: the tokenizer's EOD)")
    p.add_argument("--tasks", help="lm-eval tasks, comma separated (e.g. hellaswag,piqa,arc_easy)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=float, help="lm-eval: examples per task (or a fraction)")
    p.add_argument("--include-path", help="lm-eval: a directory of extra task definitions")
    p.add_argument("--json", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if not args.data and not args.tasks:
        p.error("give --data (perplexity) and/or --tasks (lm-eval)")
    rank, _ = _distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        from ..checkpoint.loading import load_model
        from ..data.tokenizers import build_tokenizer

        model, ck = load_model(args.checkpoint, args.format, device=args.device, dtype=DTYPES[args.dtype], log=say)
        args.tokenizer = _tokenizer_spec(args, ck)
        results = {"checkpoint": str(args.checkpoint), "model": variant_text(ck.config), "dtype": args.dtype}
        if args.data:
            results["perplexity"] = _perplexity(model, args, build_tokenizer(args.tokenizer).eod, say)
        if args.tasks:
            results["lm_eval"] = _tasks(model, args, say)
    except (CheckpointError, ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _perplexity(model, args, eod: int, say) -> list[dict]:
    from ..data.gpt_dataset import split_ranges
    from ..data.indexed import IndexedDataset
    from .perplexity import packed_perplexity, paper_perplexity

    seq = args.seq_length or model.cfg.max_position_embeddings
    rows = []
    for prefix in args.data:
        ds = IndexedDataset(prefix)
        docs = (0, len(ds)) if args.split == "all" else split_ranges(len(ds), args.split_ratios)[
            ["train", "valid", "test"].index(args.split)]
        start = time.perf_counter()
        if args.paper_compatible:
            real, scored, pad = paper_perplexity(model, ds, docs, seq, args.batch_size,
                                                 eod if args.pad_id is None else args.pad_id)
            row = {"data": prefix, "documents": docs[1] - docs[0], "tokens": real.tokens, "loss": real.loss,
                   "perplexity": real.perplexity, "loss_padding_scored": scored.loss,
                   "perplexity_padding_scored": scored.perplexity, "padding_fraction": pad}
        else:
            r = packed_perplexity(model, ds, docs, seq, args.batch_size, args.tokens)
            row = {"data": prefix, "documents": docs[1] - docs[0], "tokens": r.tokens, "loss": r.loss,
                   "perplexity": r.perplexity}
        if row["tokens"] == 0:
            raise DataError(f"{prefix}: no tokens to predict in --split {args.split} (documents {docs[0]}:{docs[1]} "
                            f"of {len(ds)} hold no token that follows another"
                            + (" in its document" if args.paper_compatible else "")
                            + "); choose another --split or --split-ratios")
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    say(f"{'data':<50} {'tokens':>10} {'loss':>8} {'ppl':>10}"
        + (f" {'loss (pad scored)':>18} {'ppl (pad scored)':>17} {'pad %':>6}" if args.paper_compatible else ""))
    for r in rows:
        say(f"{r['data']:<50} {r['tokens']:>10,} {r['loss']:>8.4f} {r['perplexity']:>10.2f}"
            + (f" {r['loss_padding_scored']:>18.4f} {r['perplexity_padding_scored']:>17.2f} "
               f"{100 * r['padding_fraction']:>5.1f}%" if args.paper_compatible else ""))
    return rows


def _tasks(model, args, say) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .harness import MegaqkvLM

    lm = MegaqkvLM(model=model, tokenizer=args.tokenizer, batch_size=args.batch_size)
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    out = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot,
                                  limit=args.limit, task_manager=manager, log_samples=False)
    results = out["results"]
    for task, metrics in results.items():
        say(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return json.loads(json.dumps(results, default=str))


def generate_main(argv=None) -> int:
    from ..model.generation import LIMITS, Sampling, generate

    p = argparse.ArgumentParser(prog="generate.py", description="KV-cached text generation.")
    _checkpoint_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="repeatable: several prompts form one batch")
    p.add_argument("--prompt-file", help="one prompt per line")
    limited = lambda kind, name: checked(kind, *LIMITS[name])
    p.add_argument("--max-new-tokens", type=limited(int, "max_new_tokens"), default=64)
    p.add_argument("--temperature", type=limited(float, "temperature"), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=limited(int, "top_k"), default=0, help="0: no top-k filter")
    p.add_argument("--top-p", type=limited(float, "top_p"), default=1.0, help="1: no nucleus filter")
    p.add_argument("--stop", nargs="*", default=[], help="stop strings (the end-of-document token always stops)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=POSITIVE, default=1, help="tensor-parallel size (launch that many processes)")
    args = p.parse_args(argv)
    prompts = args.prompt + (Path(args.prompt_file).read_text().splitlines() if args.prompt_file else [])
    if not prompts:
        p.error("give --prompt TEXT or --prompt-file FILE")
    rank, grid = _distributed(args.tp)
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        from ..checkpoint.loading import build_model, detect, read
        from ..data.tokenizers import build_tokenizer
        from ..kernels.attention import kernels_text
        from ..parallel.grid import SINGLE

        path = Path(args.checkpoint)
        ck = read(path, args.format or detect(path), with_optimizer=False, log=say)
        model = build_model(ck, grid.tp if grid else SINGLE, args.device, DTYPES[args.dtype])
        tok = build_tokenizer(_tokenizer_spec(args, ck))
        say(kernels_text(model.cfg.attention_backend, model.wte.weight, model.layers[0].attn.cols, 0.0))
        result = generate(model, [tok.encode_batch([t])[0] for t in prompts],
                          Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, (tok.eod,), args.seed),
                          vocab_size=tok.vocab_size)
    except (CheckpointError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for prompt, tokens in zip(prompts, result.tokens):
        text = tok.decode(tokens)
        cuts = [text.find(s) for s in args.stop if s in text]
        say(f"=== {prompt}\n{prompt}{text[:min(cuts)] if cuts else text}")
    new = sum(len(t) for t in result.tokens)
    say(f"--- {variant_text(ck.config)}; KV cache {result.cache_bytes:,} bytes allocated on this rank "
        f"({result.cache_bytes_per_token:,.0f} bytes per token slot, {args.dtype}); prefill {result.prefill_seconds:.2f} s, "
        f"{new} tokens in {result.decode_seconds:.2f} s ({new / max(result.decode_seconds, 1e-9):.1f} tokens/s)")
    return 0
