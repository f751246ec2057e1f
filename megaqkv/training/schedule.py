"""Learning-rate schedule: linear warmup from 0, then cosine (or linear) decay to min_lr at the last step."""
from __future__ import annotations

import math

import torch

from ..config import TrainingConfig


class WarmupDecay:
    """Multiplier of the base LR at a step; a plain object so LambdaLR can save and restore it."""

    def __init__(self, cfg: TrainingConfig, total_steps: int):
        self.warmup, self.total, self.kind = cfg.warmup_steps, max(total_steps, 1), cfg.lr_schedule
        self.floor = cfg.min_lr / cfg.lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.floor + (1 - self.floor) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(cfg, total_steps))


def align_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainingConfig, total_steps: int,
                   step: int) -> None:
    """After loading a checkpoint: this run's config decides the schedule (peak LR, warmup, length), the
    checkpoint only the position in it. Identical to what the checkpoint saved when the config is unchanged;
    it lets a run be extended, and a converted checkpoint start with the schedule of the run that loads it."""
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [WarmupDecay(cfg, total_steps) for _ in groups]
    scheduler.base_lrs = [cfg.lr for _ in groups]
    scheduler.last_epoch = step
    scheduler._last_lr = [cfg.lr * fn(step) for fn in scheduler.lr_lambdas]
    for group, lr in zip(groups, scheduler._last_lr):
        group["lr"] = lr
