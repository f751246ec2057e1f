"""Console lines and TensorBoard scalars; throughput, achieved TFLOP/s and MFU in two conventions.

FLOP conventions, per trained token (activation recomputation is never counted: MFU, not hardware FLOPs
utilisation):

* ours (`mfu`): 3 × 2 × the *exact* forward MACs of megaqkv.analysis (the fused projection by the rows the
  variant really has — fewer for K=V, GQA and MQA — attention over the causal triangle, output projection,
  MLP, LM head; biases, norms and softmax excluded), so a variant is credited only with the work it does;
* Megatron's (`mfu_megatron`): analysis.megatron_flops_per_token, what Megatron-LM's
  num_floating_point_operations reports for the equivalent GQA model (q, k and v counted separately, the
  full T×T attention), for comparison with numbers published from Megatron.

MFU divides the achieved TFLOP/s per device by the device's peak, in this order: `logging.peak_tflops`; on
a GPU the dense bf16/fp16 datasheet peak of GPU_PEAK_TFLOPS (TF32, half of it, for fp32 runs); on a CPU a
calibration (CPU_CALIBRATION) measured once per CPU model, thread count, dtype and torch version and cached
in cpu_peak_cache(), so that identical work prints the same MFU at every start (delete the file to
measure again).
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..analysis import megatron_flops_per_token, training_flops_per_token
from ..config import Config
from ..parallel.grid import uses_cuda

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s per device, from the vendors' datasheets, keyed by
# what torch.cuda.get_device_name() contains. A key matches as a whole word (`gpu_peak_tflops`) and longer keys
# are tried first, so "H100 PCIe" wins over "H100" (the SXM part reports "NVIDIA H100 80GB HBM3") and "L4"
# matches neither "L40" nor "L40S". V100 and T4 have no bf16 tensor cores: theirs are fp16 peaks.
GPU_PEAK_TFLOPS = {
    "B200": 2250.0, "H200": 989.0, "H200 NVL": 835.0, "GH200": 989.0, "H100": 989.0, "H100 PCIe": 756.0,
    "H100 NVL": 835.0, "H800": 989.0, "H800 PCIe": 756.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
    "A30": 165.0, "A40": 149.7, "A10": 125.0, "A10G": 70.0,  # A10G: AWS's figure, no NVIDIA datasheet
    "A6000": 154.8, "RTX 6000 Ada": 364.2, "L4": 121.0, "L40": 181.0, "L40S": 362.0, "RTX 4090": 165.2,
    "V100": 125.0, "V100-PCIE": 112.0, "V100S": 130.0, "T4": 65.0,
    "MI300X": 1307.4, "MI325X": 1307.4, "MI250X": 383.0,
}
CPU_CALIBRATION = "2·n³ / the fastest of n×n matmuls repeated for 1 s (at least 7), n = 2048, after a warm-up"


def gpu_peak_tflops(name: str) -> float | None:
    """The datasheet peak of the GPU torch names `name`, or None when the table lacks it."""
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name, re.IGNORECASE):
            return GPU_PEAK_TFLOPS[key]
    return None


def measure_cpu_peak_tflops(dtype: torch.dtype, size: int = 2048, seconds: float = 1.0, repeats: int = 7) -> float:
    """CPU_CALIBRATION. Other load only ever slows a matmul, so the fastest repeat estimates the peak: on a
    shared 2-core VM, four 2 s windows (bf16, 1 thread) gave medians of 0.32-0.75 TFLOP/s and fastest repeats
    of 0.79-0.94. Heavier load lowers both, hence the load recorded with the cached value."""
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout, exact resume) untouched
    a, b = (torch.randn(size, size, generator=gen).to(dtype) for _ in range(2))
    a @ b
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size ** 3 / min(times) / 1e12


def cpu_peak_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megaqkv" / "cpu_peak.json"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows where that file is missing."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def cpu_peak_tflops(dtype: torch.dtype) -> tuple[float, str]:
    """The cached calibration of this CPU, thread count, dtype and torch version; measured and cached (written
    atomically, so concurrent ranks cannot tear it) when absent. An unreadable cache is measured again with a
    warning, and an unwritable one only costs the measurement at the next start."""
    path = cpu_peak_cache()
    key = f"{cpu_model()} | {torch.get_num_threads()} thread(s) | {dtype} | torch {torch.__version__}"
    cache: dict = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
            entry = cache.get(key)
            if entry is not None:
                peak = float(entry["tflops"])
                if not (math.isfinite(peak) and peak > 0):
                    raise ValueError(f"peak {peak}")
                return peak, f"CPU calibration cached in {path} ({key}; measured {entry['measured']})"
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            warnings.warn(f"{path}: unreadable CPU peak cache ({type(exc).__name__}: {exc}); measuring again",
                          stacklevel=2)
            cache = {}
    load = os.getloadavg()[0]  # a busy machine measures low, and the cache keeps it: the start line says so
    peak = measure_cpu_peak_tflops(dtype)
    measured = f"{time.strftime('%Y-%m-%d %H:%M:%S')} at load {load:.1f} on {os.cpu_count()} CPUs"
    cache[key] = {"tflops": peak, "measured": measured, "method": CPU_CALIBRATION}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cpu_peak-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"cannot cache the CPU peak in {path} ({exc}); it is measured again at the next start",
                      stacklevel=2)
    return peak, f"CPU calibration measured now ({key}; {measured}), cached in {path}"


def device_peak_tflops(cfg: Config) -> tuple[float, str]:
    """Peak TFLOP/s of one device and where the number comes from (printed at start)."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops, "logging.peak_tflops"
    if uses_cuda():
        name = torch.cuda.get_device_name()
        peak = gpu_peak_tflops(name)
        if peak is None:
            return float("nan"), f"{name} is not in the datasheet table; set logging.peak_tflops"
        if cfg.training.precision == "fp32":
            return peak / 2, f"{name} datasheet, dense TF32 (half the bf16 rate)"
        return peak, f"{name} datasheet, dense bf16/fp16"
    return cpu_peak_tflops(torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32)


def memory_gib() -> float:
    """Peak memory since reset_peak_memory(): CUDA's allocator, or the process's peak resident set on a CPU."""
    if uses_cuda():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    try:  # Linux: VmHWM, which reset_peak_memory() can lower (ru_maxrss never goes down)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def reset_peak_memory() -> None:
    """Start a run's peak memory afresh, so that runs trained one after another in one process (tools/ablate.py)
    each report their own peak rather than the largest so far."""
    gc.collect()
    if uses_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # elsewhere the peak stays the process's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux ≥ 4.0)


RUN_RECORD = "run.json"


def write_run_record(log_dir: Path, cfg: Config, world_size: int) -> None:
    """The resolved config, world size and device beside metrics.jsonl, so that a run's metrics can be read
    (tools/compare_runs.py) without opening a checkpoint; rewritten at every start, atomically."""
    device = torch.cuda.get_device_name() if uses_cuda() else cpu_model()
    record = {"config": cfg.to_dict(), "world_size": world_size, "device": device}
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = log_dir / f".{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, log_dir / RUN_RECORD)


class Monitor:
    """Prints and records on global rank 0; every rank keeps the timing it needs for ETA."""

    def __init__(self, cfg: Config, world_size: int, is_writer: bool, total_steps: int, log=print,
                 first_step: int = 1):
        self.cfg, self.world, self.is_writer, self.total_steps, self.log = cfg, world_size, is_writer, total_steps, log
        self.tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_length
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.training.seq_length, "exact")
        self.megatron_flops_per_token = megatron_flops_per_token(cfg.model, cfg.training.seq_length)
        self.peak, self.peak_source = device_peak_tflops(cfg)
        self.started = time.perf_counter()
        self.window: list[float] = []
        self.writer = None
        if is_writer and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run first drops what a killed run logged after its checkpoint, as metrics.jsonl does
            self.writer = SummaryWriter(log_dir=cfg.logging.tensorboard_dir,
                                        purge_step=first_step if first_step > 1 else None)
            write_run_record(Path(cfg.logging.tensorboard_dir), cfg, world_size)
        if is_writer:
            log(f"MFU convention: {self.flops_per_token / 1e6:.1f} MFLOP per trained token (6 × exact forward "
                f"MACs/token: real projection rows, causal attention); Megatron's: "
                f"{self.megatron_flops_per_token / 1e6:.1f} MFLOP (Megatron-LM num_floating_point_operations of "
                f"the equivalent GQA model: q, k, v separate, full T×T attention); peak {self.peak:.2f} TFLOP/s "
                f"per device ({self.peak_source})")

    def step(self, step: int, consumed_tokens: int, loss: float, lr: float, grad_norm: float, skipped: int,
             seconds: float) -> dict:
        self.window = (self.window + [seconds])[-20:]
        step_time = sorted(self.window)[len(self.window) // 2]
        tokens_per_s = self.tokens_per_step / step_time
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12
        per_peak = tokens_per_s / self.world / 1e12 / self.peak  # NaN when the peak is unknown
        record = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "lr": lr, "grad_norm": grad_norm,
                  "skipped_steps": skipped, "tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
                  "mfu": per_peak * self.flops_per_token, "mfu_megatron": per_peak * self.megatron_flops_per_token,
                  "memory_gib": memory_gib(),
                  "consumed_tokens": consumed_tokens, "elapsed_s": time.perf_counter() - self.started,
                  "eta_s": step_time * (self.total_steps - step)}
        if self.writer:
            for key, value in record.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.is_writer and (step % self.cfg.logging.interval == 0 or step == self.total_steps):
            self.log(f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | ppl {record['perplexity']:9.2f} | "
                     f"lr {lr:.3e} | grad norm {grad_norm:7.3f} | skipped {skipped} | "
                     f"{tokens_per_s:,.0f} tok/s | {tflops:.3f} TFLOP/s/dev | MFU {100 * record['mfu']:.1f}% "
                     f"(Megatron {100 * record['mfu_megatron']:.1f}%) | "
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
