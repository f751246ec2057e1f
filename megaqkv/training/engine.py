"""DeepSpeed engine wiring: batch arithmetic, the DeepSpeed config, the optimiser and the pipeline engine."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, TrainingConfig
from ..model.pipeline import build_pipeline
from ..parallel.grid import ProcessGrid

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
            raise ConfigError(
                f"training.global_batch_size={total} is not a multiple of training.micro_batch_size={micro} × "
                f"data-parallel size {dp} = {per_step}; use a global batch of {max(1, total // per_step) * per_step} "
                f"or {(total // per_step + 1) * per_step}, or change the micro batch")
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
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage > 1:
        raise ConfigError(f"{source}: zero_optimization.stage={stage}: DeepSpeed's pipeline engine supports ZeRO "
                          "stages 0 and 1 only; use stage 1")
    ds.update(derived)
    ds["gradient_clipping"] = cfg.training.grad_clip
    precision = cfg.training.precision
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    if precision != "bf16":
        ds.pop("data_types", None)  # fp32 gradient accumulation is the bf16 optimiser's option
    return ds


def build_optimizer(params, training: TrainingConfig) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA): no JIT-built extension is needed on any machine."""
    return torch.optim.AdamW(params, lr=training.lr, betas=tuple(training.betas), eps=training.eps,
                             weight_decay=training.weight_decay, fused=torch.cuda.is_available())


def build_engine(cfg: Config, grid: ProcessGrid, ds_config: str | Path | None = None, lr_scheduler=None):
    """The pipeline module of this rank's stage inside a DeepSpeed PipelineEngine (for any PP, including 1)."""
    import deepspeed

    batch = derive_batch(cfg.training, grid.dp_size)
    ds = deepspeed_config(cfg, batch, *read_ds_config(ds_config))
    grid.seed(cfg.training.seed)
    module = build_pipeline(cfg.model, grid, seed=cfg.training.seed,
                            checkpointed=cfg.parallel.activation_checkpointing)
    optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], cfg.training)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds, lr_scheduler=lr_scheduler)
    return engine
