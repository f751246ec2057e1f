"""tools/convert_ckpt.py: between DeepSpeed training checkpoints, consolidated, the paper's format and HF.

    convert_ckpt.py [--from FMT] --to FMT --input PATH --output PATH [--tp N --pp M --dp K] [--weights-only]
                    [--tokenizer SPEC]

`--to hf` writes the native transformers model (each variant as itself, its cache savings kept),
`--to hf-gpt2` a GPT2LMHeadModel with shared roles duplicated, for tools that know only GPT-2; both
with tokenizer, generation config and model card, and both import back (`--from hf`).
    convert_ckpt.py verify PATH_A PATH_B [--tokens 128] [--atol 1e-4]

Every conversion goes through the consolidated form; formats are detected from the input when
--from is not given. `verify` loads two checkpoints of any formats (an HF directory through
`transformers` itself) and compares their logits on the same tokens.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from .arguments import POSITIVE
from .checkpoint import consolidated, hf, paper
from .checkpoint.consolidated import CheckpointError
from .checkpoint.loading import FORMATS, READABLE, build_model, detect, read

def logits_of(path: Path, fmt: str, tokens: torch.Tensor, tag: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        if fmt == "hf":  # through transformers itself (the native model is registered by importing megaqkv)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
            return model(tokens).logits
        return build_model(read(path, fmt, tag, with_optimizer=False)).forward(tokens).logits


def convert(args, log=print) -> Path:
    src = Path(args.input)
    fmt_in = args.from_format or detect(src)
    start = time.perf_counter()
    ck = read(src, fmt_in, args.tag, with_optimizer=not args.weights_only, log=log)
    out = Path(args.output)
    if args.to == "consolidated":
        consolidated.save(ck, out, args.force)
    elif args.to == "paper":
        paper.write(ck, out, args.force)
    elif args.to in ("hf", "hf-gpt2"):
        hf.export(ck, out, args.force, "native" if args.to == "hf" else "gpt2", args.tokenizer)
    else:
        from .training import materialize
        from .config import FieldError, check_parallel_fits_model

        try:
            check_parallel_fits_model(ck.config, args.tp, args.pp, "--")
        except FieldError as exc:
            raise CheckpointError(f"{exc.key}: {exc.message}") from None
        precision = args.precision or (ck.trainer or {}).get("precision") or "bf16"
        with tempfile.TemporaryDirectory(prefix="megaqkv-consolidated-") as tmp:
            source = src if fmt_in == "consolidated" and not args.weights_only else consolidated.save(
                ck, Path(tmp) / "ck")
            materialize.write(source, out, args.tp, args.pp, args.dp, precision, args.force)
    log(f"{fmt_in} {src} -> {args.to} {out} ({time.perf_counter() - start:.1f} s; "
        f"{consolidated.variant_text(ck.config)}"
        + (f"; optimizer state and step {ck.trainer.get('step')} carried"
           if ck.optimizer and ck.trainer and args.to in ("consolidated", "deepspeed") else "") + ")")
    return out


def verify(args, log=print) -> int:
    a, b = Path(args.a), Path(args.b)
    fa, fb = detect(a), detect(b)
    g = torch.Generator().manual_seed(args.seed)
    vocab = min(read(p, f, with_optimizer=False, log=lambda *x: None).config.vocab_size for p, f in ((a, fa), (b, fb)))
    tokens = torch.randint(0, vocab, (2, args.tokens), generator=g)
    la, lb = logits_of(a, fa, tokens), logits_of(b, fb, tokens)
    if la.shape != lb.shape:
        n = min(la.shape[-1], lb.shape[-1])
        la, lb = la[..., :n], lb[..., :n]
    diff = (la.float() - lb.float()).abs().max().item()
    ok = diff <= args.atol
    log(f"{fa} {a} vs {fb} {b}: max |logit difference| {diff:.3g} over {tokens.numel()} tokens "
        f"(tolerance {args.atol:g}): {'same model' if ok else 'DIFFERENT'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        p = argparse.ArgumentParser(prog="convert_ckpt.py verify", description="Compare two checkpoints' logits.")
        p.add_argument("a")
        p.add_argument("b")
        p.add_argument("--tokens", type=POSITIVE, default=128)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--atol", type=float, default=1e-4)
        args = p.parse_args(argv[1:])
        runner = verify
    else:
        p = argparse.ArgumentParser(prog="convert_ckpt.py", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--from", dest="from_format", choices=READABLE,
                       help="input format (default: detected; universal: a DeepSpeed ds_to_universal folder)")
        p.add_argument("--to", choices=FORMATS, required=True)
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--tag", help="DeepSpeed input: the global_stepN to read (default: latest, or latest_universal)")
        p.add_argument("--tp", type=POSITIVE, default=1, help="--to deepspeed: tensor-parallel size")
        p.add_argument("--pp", type=POSITIVE, default=1, help="--to deepspeed: pipeline size")
        p.add_argument("--dp", type=POSITIVE, default=1, help="--to deepspeed: data-parallel size (ZeRO-1 partitions)")
        p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                       help="--to deepspeed: the precision training will resume in (default: the source's, or bf16)")
        p.add_argument("--weights-only", action="store_true", help="leave the optimizer state behind")
        p.add_argument("--tokenizer", help="--to hf/hf-gpt2: the tokenizer to ship (gpt2, a sentencepiece .model, a HF "
                                           "tokenizer.json, or none; default: the one the checkpoint records, else gpt2)")
        p.add_argument("--force", action="store_true", help="replace an existing output")
        args = p.parse_args(argv)
        runner = convert
    try:
        result = runner(args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
