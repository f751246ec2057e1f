"""Console lines and TensorBoard scalars; throughput, achieved TFLOP/s and MFU.

FLOP convention: model FLOPs per trained token = 3 × 2 × the *exact* forward MACs of
megaqkv.analysis (the fused projection by the rows the variant really has — fewer for K=V,
GQA and MQA — attention over the causal triangle, output projection, MLP, LM head; biases,
norms and softmax excluded), so a variant is credited only with the work it does. Activation
recomputation is not counted (MFU, not hardware FLOPs utilisation). MFU divides the achieved
TFLOP/s per device by the device's peak: the table below for known GPUs in bf16/fp16,
`logging.peak_tflops` when given, and on a CPU the measured throughput of a large matmul.
"""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch

from ..analysis import training_flops_per_token
from ..config import Config

# Dense bf16/fp16 tensor-core peaks, TFLOP/s per device (vendor datasheets).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0, "L40S": 362.0,
                   "A6000": 155.0, "L4": 121.0, "A10": 125.0, "V100": 125.0, "RTX 4090": 165.0, "MI300X": 1307.0}


def measured_cpu_peak_tflops(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout, exact resume) untouched
    a, b = (torch.randn(size, size, generator=gen).to(dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times) / 1e12


def device_peak_tflops(cfg: Config) -> tuple[float, str]:
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops, "logging.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                scale = 0.5 if cfg.training.precision == "fp32" else 1.0  # TF32 is half the bf16 rate
                return peak * scale, f"{name} datasheet"
        return float("nan"), f"{name} unknown; set logging.peak_tflops"
    dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    return measured_cpu_peak_tflops(dtype), f"measured {dtype} matmul, {torch.get_num_threads()} thread(s)"


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class Monitor:
    """Prints and records on global rank 0; every rank keeps the timing it needs for ETA."""

    def __init__(self, cfg: Config, world_size: int, is_writer: bool, total_steps: int, log=print,
                 first_step: int = 1):
        self.cfg, self.world, self.is_writer, self.total_steps, self.log = cfg, world_size, is_writer, total_steps, log
        self.tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_length
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.training.seq_length, "exact")
        self.peak, self.peak_source = device_peak_tflops(cfg)
        self.started = time.perf_counter()
        self.window: list[float] = []
        self.writer = None
        if is_writer and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run first drops what a killed run logged after its checkpoint, as metrics.jsonl does
            self.writer = SummaryWriter(log_dir=cfg.logging.tensorboard_dir,
                                        purge_step=first_step if first_step > 1 else None)
        if is_writer:
            log(f"MFU convention: {self.flops_per_token / 1e6:.1f} MFLOP per trained token (6 × exact forward "
                f"MACs/token: real projection rows, causal attention); peak {self.peak:.2f} TFLOP/s per device "
                f"({self.peak_source})")

    def step(self, step: int, consumed_tokens: int, loss: float, lr: float, grad_norm: float, skipped: int,
             seconds: float) -> dict:
        self.window = (self.window + [seconds])[-20:]
        step_time = sorted(self.window)[len(self.window) // 2]
        tokens_per_s = self.tokens_per_step / step_time
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12
        record = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "lr": lr, "grad_norm": grad_norm,
                  "skipped_steps": skipped, "tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
                  "mfu": tflops / self.peak if self.peak == self.peak else float("nan"), "memory_gib": memory_gib(),
                  "consumed_tokens": consumed_tokens, "elapsed_s": time.perf_counter() - self.started,
                  "eta_s": step_time * (self.total_steps - step)}
        if self.writer:
            for key, value in record.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.is_writer and (step % self.cfg.logging.interval == 0 or step == self.total_steps):
            self.log(f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | ppl {record['perplexity']:9.2f} | "
                     f"lr {lr:.3e} | grad norm {grad_norm:7.3f} | skipped {skipped} | "
                     f"{tokens_per_s:,.0f} tok/s | {tflops:.3f} TFLOP/s/dev | MFU {100 * record['mfu']:.1f}% | "
                     f"mem {record['memory_gib']:.2f} GiB | tokens {consumed_tokens:,} | "
                     f"elapsed {_hms(record['elapsed_s'])} | ETA {_hms(record['eta_s'])}")
        return record

    def validation(self, step: int, loss: float, tokens: int) -> None:
        if self.writer:
            self.writer.add_scalar("valid/loss", loss, step)
            self.writer.add_scalar("valid/perplexity", math.exp(min(loss, 50.0)), step)
        if self.is_writer:
            self.log(f"validation at step {step}: loss {loss:.4f} | ppl {math.exp(min(loss, 50.0)):.2f} | "
                     f"{tokens:,} tokens")

    def close(self) -> None:
        if self.writer:
            self.writer.close()

    @property
    def log_dir(self) -> str | None:
        return str(Path(self.cfg.logging.tensorboard_dir).resolve()) if self.cfg.logging.tensorboard_dir else None


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
