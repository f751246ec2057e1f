"""DeepSpeed engine wiring: batch arithmetic, the DeepSpeed config, the optimiser and the pipeline engine."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, TrainingConfig
from ..model.pipeline import build_pipeline
from ..parallel.grid import ProcessGrid, uses_cuda

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DS_CONFIG = REPO_ROOT / "ds_configs" / "zero1_bf16.json"
# Keys of the DeepSpeed config that megaqkv derives from its own config.
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size


def derive_batch(training: TrainingConfig, dp: int) -> BatchLayout:
    """global batch = micro batch × gradient accumulation × DP; any missing one is derived, a mismatch is an error."""
    micro, gas, total = training.micro_batch_size, training.gradient_accumulation_steps, training.global_batch_size
    if total is None:
        return BatchLayout(micro, gas or 1, dp)
    per_step = micro * dp
    if gas is None:
        if total % per_step:
            nearest = [n for n in (total // per_step * per_step, (total // per_step + 1) * per_step) if n > 0]
            raise ConfigError(
                f"training.global_batch_size={total} is not a multiple of training.micro_batch_size={micro} × "
                f"data-parallel size {dp} = {per_step}; use a global batch of {' or '.join(map(str, nearest))}, "
                "or change the micro batch")
        return BatchLayout(micro, total // per_step, dp)
    if micro * gas * dp != total:
        raise ConfigError(
            f"training.global_batch_size={total} disagrees with training.micro_batch_size={micro} × "
            f"training.gradient_accumulation_steps={gas} × data-parallel size {dp} = {micro * gas * dp}; "
            "set only two of the three")
    return BatchLayout(micro, gas, dp)


def read_ds_config(path: str | Path | None) -> tuple[dict, str]:
    path = Path(path) if path else DEFAULT_DS_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None


def deepspeed_config(cfg: Config, batch: BatchLayout, base: dict, source: str) -> dict:
    """The DeepSpeed config: the file's settings (ZeRO, communication) plus what megaqkv's config decides."""
    ds = copy.deepcopy(base)
    derived = {"train_batch_size": batch.global_batch_size,
               "train_micro_batch_size_per_gpu": batch.micro_batch_size,
               "gradient_accumulation_steps": batch.gradient_accumulation_steps}
    for key in _BATCH_KEYS:
        if key in ds and ds[key] != derived[key]:
            raise ConfigError(f"{source}: {key}={ds[key]} disagrees with the training config ({key}={derived[key]} "
                              f"from micro batch {batch.micro_batch_size}, accumulation "
                              f"{batch.gradient_accumulation_steps}, DP {batch.data_parallel_size}); remove it from "
                              "the DeepSpeed config, batch sizes come from training.*")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{source}: 'optimizer'/'scheduler' are set by megaqkv from training.* (lr, betas, eps, "
                          "weight_decay, schedule); remove them from the DeepSpeed config")
    if ds.get("checkpoint", {}).get("load_universal"):
        if not cfg.checkpoint.load:
            raise ConfigError(f"{source}: checkpoint.load_universal: name the universal checkpoint to start from "
                              "with checkpoint.load (--set checkpoint.load=<ds_to_universal output folder>)")
        # megaqkv loads it (training/loop.py), at any layout; left on, DeepSpeed would read this run's own later
        # checkpoints as universal ones when it resumes
        ds["checkpoint"] = {k: v for k, v in ds["checkpoint"].items() if k != "load_universal"}
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage > 1:
        raise ConfigError(f"{source}: zero_optimization.stage={stage}: DeepSpeed's pipeline engine supports ZeRO "
                          "stages 0 and 1 only; use stage 1")
    ds.update(derived)
    # DeepSpeed counts a sequence-parallel rank as a data-parallel one, each reading a slice of every sample.
    ds["train_batch_size"] *= cfg.parallel.sp
    ds["gradient_clipping"] = cfg.training.grad_clip
    precision = cfg.training.precision
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    if precision != "bf16":
        ds.pop("data_types", None)  # fp32 gradient accumulation is the bf16 optimiser's option
    return ds


def build_optimizer(named_params, training: TrainingConfig) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA): no JIT-built extension is needed on any machine. The paper decays every
    parameter; with `decay_norms_and_biases: false` biases and LayerNorm weights (the 1-D tensors) are exempt."""
    decay, exempt = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if training.decay_norms_and_biases or p.ndim > 1 else exempt).append(p)
    groups = [{"params": decay, "weight_decay": training.weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=training.lr, betas=tuple(training.betas), eps=training.eps,
                             fused=all(p.is_cuda for p in decay + exempt))


def skip_steps_above(engine, optimizer: torch.optim.Optimizer, bound: float | None) -> None:
    """Skip the update of a step whose global gradient norm (pre-clipping) exceeds `bound`.

    DeepSpeed's ZeRO and bf16 optimizers compute the norm before calling our optimizer's step; we leave
    the weights untouched and raise its overflow flag, so DeepSpeed counts the step as skipped and does
    not advance the LR schedule, exactly as for an fp16 overflow.
    """
    if bound is None:
        return
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    wrapper = engine.optimizer
    if not isinstance(wrapper, (BF16_Optimizer, DeepSpeedZeroOptimizer)):
        raise ConfigError("training.skip_grad_norm_above needs DeepSpeed's ZeRO (stage 1) or bf16 optimizer, "
                          "which compute the gradient norm before stepping; enable ZeRO stage 1 or set it to null")
    inner_step = optimizer.step

    def step(*args, **kwargs):
        norm = getattr(wrapper, "_global_grad_norm", None)
        if norm is not None and float(norm) > bound:
            wrapper.overflow = True
            return None
        return inner_step(*args, **kwargs)

    optimizer.step = step


def compiled(cfg: Config) -> bool:
    """`model.compile`, whose default (null) is on for CUDA runs and off for CPU runs: inductor's compile time
    there (tens of seconds per graph) buys little over eager CPU kernels."""
    return cfg.model.compile if cfg.model.compile is not None else uses_cuda()


def build_engine(cfg: Config, grid: ProcessGrid, ds_config: str | Path | None = None, total_steps: int = 1):
    """The pipeline module of this rank's stage in a DeepSpeed PipelineEngine (any PP, including 1), with
    AdamW, the warmup/decay LR schedule and the large-gradient skip rule."""
    import deepspeed

    from .schedule import build_scheduler

    batch = derive_batch(cfg.training, grid.dp_size)
    ds = deepspeed_config(cfg, batch, *read_ds_config(ds_config))
    grid.seed(cfg.training.seed)
    module = build_pipeline(cfg.model, grid, seed=cfg.training.seed, checkpointed=cfg.parallel.activation_checkpointing,
                            compiled=compiled(cfg), seq_length=cfg.training.seq_length)
    optimizer = build_optimizer(module.named_parameters(), cfg.training)
    scheduler = build_scheduler(optimizer, cfg.training, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds, lr_scheduler=scheduler)
    skip_steps_above(engine, optimizer, cfg.training.skip_grad_norm_above)
    return engine
