"""Shared by the benchmarks: run a command and measure its wall time, CPU time and peak memory (process tree);
random 300M-shaped weights."""
from __future__ import annotations

import dataclasses
import resource
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parent.parent


def random_weights(preset: str, positions: int, seed: int):
    """Consolidated 300M-shaped weights of a preset, every canonical tensor ~ N(0, 0.02) (LayerNorm included)."""
    from megaqkv.checkpoint.consolidated import Consolidated
    from megaqkv.config import load_model_config
    from megaqkv.parallel.sharding import canonical_shapes

    cfg = load_model_config(REPO / "model_configs" / f"300M_{preset}.yaml")
    cfg = dataclasses.replace(cfg, max_position_embeddings=positions, hidden_dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    return Consolidated(cfg, {k: torch.empty(s).normal_(0, 0.02, generator=g)
                              for k, s in canonical_shapes(cfg).items()})


def tree_rss(pid: int) -> int:
    """Summed resident memory (bytes) of a process and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue
    return total


class Measured(NamedTuple):
    wall: float  # seconds
    peak: int  # largest summed RSS of the process tree, bytes, sampled every 20 ms
    stdout: str
    cpu: float  # user + system seconds of the process and the children it waited for


def run_measured(cmd: list[str], env: dict | None = None) -> Measured:
    """Runs a command to completion (one at a time: CPU time is this process's reaped-children total); raises on
    failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Measured(wall, peak[0], stdout, cpu)


def two_pass_attention(q, keys, values, valid, start):
    """The cached attention megaqkv had before its blocked kernel (the baseline the benchmarks compare with):
    the scores of the whole cache in one product, then the values in a second pass over it."""
    import torch

    b, n, heads, d = q.shape
    groups, length = keys.shape[1], start + n
    k, v = keys[:, :, :length], values[:, :, :length]
    grouped = q.reshape(b, n, groups, heads // groups, d).permute(0, 2, 3, 1, 4).reshape(b, groups, -1, d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * d ** -0.5
    slot, query = torch.arange(length, device=q.device), torch.arange(start, length, device=q.device)[:, None]
    seen = (slot <= query) & (valid[:, None, :length] | (slot == query))  # [b, n, length]
    scores = scores.view(b, groups, heads // groups, n, -1).masked_fill(~seen[:, None, None], float("-inf"))
    probs = scores.softmax(-1).to(v.dtype).view(b, groups, -1, length)
    out = torch.matmul(probs, v)
    return out.view(b, groups, heads // groups, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, heads, d)
