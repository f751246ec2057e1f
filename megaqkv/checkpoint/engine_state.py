"""Load a consolidated checkpoint into a live DeepSpeed engine at any TP × PP × DP.

Each rank takes its shard of every canonical tensor (`parallel/sharding.py`) for the module's
(possibly bf16) parameters, the fp32 master copies and the Adam moments, set through DeepSpeed's
public `safe_set_full_*` API, which scatters them over the ZeRO-1 partitions. The LR schedule,
step counters and data position follow the trainer state, so training continues where the
checkpoint left it, at whatever layout this run has.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import Config
from ..model.pipeline import named_plain_parameters
from ..parallel.grid import ProcessGrid
from ..parallel.sharding import shard_from_canonical
from .consolidated import STATE_KEYS, CheckpointError, Consolidated, variant_text


def _create_adam_state(engine, step: float) -> None:
    """Materialise AdamW's per-partition state now (torch creates it lazily at the first step) and let
    DeepSpeed link it to the parameters, so the moments can be set before training starts."""
    inner = engine.optimizer.optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            device = p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
            inner.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32, device=device),
                              "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def load_into_engine(engine, grid: ProcessGrid, cfg: Config, ck: Consolidated, where: str) -> int:
    """Returns the number of samples consumed (0 when the checkpoint carries no training state); the caller
    aligns the LR schedule with `engine.global_steps`."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if dataclasses.replace(ck.config, attention_backend=cfg.model.attention_backend) != cfg.model:
        raise CheckpointError(f"{where}: holds {variant_text(ck.config)}; this run's model config is "
                              f"{variant_text(cfg.model)} — use the checkpoint's own model config")
    tp = grid.tp
    with_state = bool(ck.optimizer) and ck.trainer is not None and ck.trainer.get("optimizer_step")
    if with_state:
        _create_adam_state(engine, ck.trainer["optimizer_step"])
    for plain, p in named_plain_parameters(engine.module, cfg.model):
        value = shard_from_canonical(plain, ck.weights.__getitem__, cfg.model, tp.size, tp.rank).float()
        with torch.no_grad():
            p.copy_(value.to(p.dtype))
        safe_set_full_fp32_param(p, value.to(p.device))
        if with_state:
            for key in STATE_KEYS:
                state = shard_from_canonical(plain, ck.optimizer[key].__getitem__, cfg.model, tp.size, tp.rank)
                safe_set_full_optimizer_state(p, state.float().to(p.device), key)
    if ck.trainer is None:
        return 0
    step = int(ck.trainer.get("step", 0))
    engine.global_steps = step
    engine.skipped_steps = int(ck.trainer.get("skipped_steps", 0))
    consumed = int(ck.trainer.get("consumed_samples", 0))
    engine.global_samples = consumed
    return consumed
