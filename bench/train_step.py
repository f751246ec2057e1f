"""One training step (forward, fused or unfused head + loss, backward) of the plain model, timed in this
checkout and in another one (`--baseline DIR`, e.g. a `git worktree` of an earlier commit), alternating
processes so that both see the same machine load. Reports the median step time and the ratio.

    git worktree add /tmp/before <commit> && python bench/train_step.py --baseline /tmp/before
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(globals().get("__file__", sys.argv[0])).resolve().parent.parent
SHAPES = {"tiny": dict(num_layers=2, hidden_size=128, num_heads=4, ffn_hidden_size=512),
          "4x512": dict(num_layers=4, hidden_size=512, num_heads=8, ffn_hidden_size=2048)}


def step_times(shape: str, batch: int, seq: int, vocab: int, repeats: int) -> list[float]:
    import torch

    from megaqkv.config import ModelConfig
    from megaqkv.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[shape], vocab_size=vocab, max_position_embeddings=seq, sharing="kv",
                      hidden_dropout=0.0)
    model = GPT(cfg, seed=0)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="another checkout of megaqkv (the 'before')")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", nargs=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(step_times(a.one[0], a.batch, a.seq, a.vocab, a.repeats)))
        return
    print(f"training step of the plain model (Q–K=V), batch {a.batch} × seq {a.seq}, vocab {a.vocab:,}; "
          f"median of {a.rounds} × {a.repeats} steps per checkout\n")
    print("| shape | before | after | after / before |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        times = {"before": [], "after": []}
        for _ in range(a.rounds):
            for which, root in (("before", Path(a.baseline).resolve()), ("after", HERE)):
                cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(root)!r}); "
                       f"sys.argv = [{str(HERE / 'bench' / 'train_step.py')!r}, '--baseline', '-', '--one', {shape!r}, '--batch', '{a.batch}', '--seq', "
                       f"'{a.seq}', '--vocab', '{a.vocab}', '--repeats', '{a.repeats}']; "
                       f"exec(open({str(HERE / 'bench' / 'train_step.py')!r}).read())"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root).stdout
                times[which] += json.loads(out.strip().splitlines()[-1])
        before, after = (statistics.median(times[k]) for k in ("before", "after"))
        print(f"| {shape} | {1000 * before:.0f} ms | {1000 * after:.0f} ms | {after / before:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
