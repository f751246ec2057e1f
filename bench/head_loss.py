"""LM head + cross-entropy, forward and backward: peak memory and time of the fused, blocked loss
(`megaqkv.kernels.cross_entropy`) against the unfused head it replaced and against torch's own
`F.cross_entropy`, at the issue's shape (8,192 tokens, vocab 50,304, hidden 1,024).

Each (implementation, dtype) runs in a fresh process: its peak resident memory above the inputs
(ru_maxrss after the first call minus before it; large tensors are mmap'ed, so freed memory leaves the
process and the peak is the live maximum) and the median of `--repeats` timed calls.

    python bench/head_loss.py [--tokens 8192] [--vocab 50304] [--hidden 1024] [--dtypes fp32 bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMPLS = ("unfused", "torch", "fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _UnfusedCrossEntropy(torch.autograd.Function):
    """The head's loss before the fused one (megaqkv ≤ 99d08d8, TP=1 path): fp32 copy, shifted logits and
    their exponentials held at once, the softmax kept for backward."""

    @staticmethod
    def forward(ctx, logits, labels):
        logits = logits.float()
        shifted = logits - logits.max(dim=-1).values.unsqueeze(-1)
        target = shifted.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), labels)
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad):
        softmax, labels = ctx.saved_tensors
        softmax.scatter_add_(-1, labels.unsqueeze(-1), -torch.ones_like(softmax[:, :1]))
        return softmax.mul_(grad.unsqueeze(-1)), None


def head_and_loss(impl: str):
    from megaqkv.kernels.cross_entropy import linear_cross_entropy
    from megaqkv.parallel.grid import SINGLE

    def run(hidden, weight, labels, weights):
        if impl == "fused":
            return linear_cross_entropy(hidden, weight, labels, weights, 0, weight.shape[0], SINGLE)
        logits = F.linear(hidden, weight)
        losses = (_UnfusedCrossEntropy.apply(logits, labels) if impl == "unfused"
                  else F.cross_entropy(logits.float(), labels, reduction="none"))
        return (losses * weights).sum()
    return run


def one(impl: str, dtype: str, tokens: int, vocab: int, hidden: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(DTYPES[dtype]).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(DTYPES[dtype]).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    weights = torch.full((tokens,), 1.0 / tokens)
    run = head_and_loss(impl)

    def step():
        h.grad = w.grad = None
        loss = run(h, w, labels, weights)
        loss.backward()
        return loss.item()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = step()
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"impl": impl, "dtype": dtype, "peak_bytes": peak, "median_s": statistics.median(times), "loss": loss,
            "grad_hidden_norm": h.grad.float().norm().item(), "grad_weight_norm": w.grad.float().norm().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    shape = (a.tokens, a.vocab, a.hidden, a.repeats)
    if a.one:
        print(json.dumps(one(*a.one, *shape)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    print(f"head + loss forward+backward: {a.tokens:,} tokens × vocab {a.vocab:,} × hidden {a.hidden:,}, torch "
          f"{torch.__version__}, {env['OMP_NUM_THREADS']} threads; one [tokens, vocab] fp32 tensor is "
          f"{a.tokens * a.vocab * 4 / 2 ** 30:.2f} GiB\n")
    print("| dtype | implementation | peak memory above inputs | median time | vs unfused: memory | time | loss |")
    print("|---|---|---|---|---|---|---|")
    for dtype in a.dtypes:
        rows = {}
        for impl in IMPLS:
            out = subprocess.run([sys.executable, __file__, "--one", impl, dtype, "--tokens", str(a.tokens),
                                  "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--repeats", str(a.repeats)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            rows[impl] = r = json.loads(out.strip().splitlines()[-1])
            base = rows["unfused"]
            print(f"| {dtype} | {impl} | {r['peak_bytes'] / 2 ** 30:.2f} GiB | {r['median_s']:.2f} s | "
                  f"{r['peak_bytes'] / base['peak_bytes']:.3f}× | {r['median_s'] / base['median_s']:.2f}× | "
                  f"{r['loss']:.5f} |", flush=True)


if __name__ == "__main__":
    main()
