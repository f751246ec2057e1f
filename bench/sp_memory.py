"""Peak activation memory per rank under sequence parallelism: one training forward + backward of one long
sample through the pipeline module, at SP=1 (one process) and SP=2 (two gloo processes, each holding half the
positions), fp32 on CPU.

Activation memory is the rise of the process's peak resident memory (ru_maxrss) over the forward and backward,
above what it held after building the model and a warm-up step at a short length: large tensors are mmap'ed,
so freed memory leaves the process and the peak is the live maximum. The vocabulary is small (default 4,096)
so that the fused loss's fixed per-block buffer does not hide the per-position activations that SP splits.

    python bench/sp_memory.py [--preset kv] [--seq 8192] [--layers 4] [--hidden 256] [--vocab 4096] [--sp 1 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megaqkv.config import load_model_config
    from megaqkv.model.pipeline import build_pipeline
    from megaqkv.parallel import ProcessGrid, init_distributed

    init_distributed()
    torch.set_num_threads(1)
    sp = dist.get_world_size()
    cfg = dataclasses.replace(load_model_config(REPO / "model_configs" / f"tiny_{args.preset}.yaml"),
                              num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                              vocab_size=args.vocab, max_position_embeddings=args.seq, hidden_dropout=0.0)
    grid = ProcessGrid(1, 1, sp)
    module = build_pipeline(cfg, grid, seq_length=args.seq)

    def step(seq: int) -> None:
        tokens = torch.randint(0, args.vocab, (1, seq + 1), generator=torch.Generator().manual_seed(0))
        n = seq // sp
        mine = slice(grid.sp_rank * n, (grid.sp_rank + 1) * n)
        loss = module.loss_fn(module(tokens[:, :-1][:, mine]), (tokens[:, 1:][:, mine], None))
        loss.backward()
        module.zero_grad(set_to_none=False)

    step(16 * sp)  # allocate the gradients and warm the kernels up, at a short length
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(args.seq)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = [None] * sp
    dist.all_gather_object(rows, {"rank": grid.sp_rank, "activation_mib": (peak - before) / 1024,
                                  "peak_mib": peak / 1024, "positions": args.seq // sp})
    if grid.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="kv")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    print(f"tiny_{args.preset} at {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: one sample of "
          f"{args.seq:,} tokens, forward + backward, fp32\n")
    print("| SP | positions per rank | activation memory per rank (MiB) | peak resident memory per rank (MiB) |")
    print("|---|---|---|---|")
    for sp in args.sp:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sp}", __file__,
                   "--worker", f"--out={out}", f"--preset={args.preset}", f"--seq={args.seq}",
                   f"--layers={args.layers}", f"--hidden={args.hidden}", f"--vocab={args.vocab}"]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"SP={sp} failed:\n{result.stderr[-3000:]}")
            rows = json.loads(out.read_text())
        cells = [" / ".join(f"{r[key]:.0f}" for r in rows) for key in ("activation_mib", "peak_mib")]
        print(f"| {sp} | {rows[0]['positions']:,} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
