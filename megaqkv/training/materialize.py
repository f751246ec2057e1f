"""Consolidated -> a native DeepSpeed training checkpoint at a chosen TP × PP × DP.

The checkpoint is written by DeepSpeed itself: TP·PP·DP local processes (gloo on CPU) build the
engine at that layout, load the consolidated weights and optimizer state into it
(`engine_state.load_into_engine`) and save. `pretrain.py` then resumes from it like from its own.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint.consolidated import writing
from ..parallel.grid import free_port


def _worker(rank: int, world: int, port: int, source: str, out: str, tp: int, pp: int, precision: str) -> None:
    # CPU processes (gloo) whatever the machine: the layout may need more ranks than there are GPUs
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from ..config import Config, DataConfig, ParallelConfig, TrainingConfig
    from ..parallel import ProcessGrid, init_distributed
    from ..checkpoint import consolidated
    from ..checkpoint.engine_state import load_into_engine
    from . import checkpointing
    from .engine import build_engine

    init_distributed(timeout_s=600)
    ck = consolidated.load(source, lazy=True)
    trainer = ck.trainer or {}
    groups = trainer.get("param_groups") or [{}]
    g = groups[0]
    training = TrainingConfig(
        micro_batch_size=1, gradient_accumulation_steps=1,
        seq_length=trainer.get("seq_length") or ck.config.max_position_embeddings,
        precision=precision, lr=float(g.get("initial_lr", g.get("lr", 2e-4))),
        betas=list(g.get("betas", (0.9, 0.95))), eps=float(g.get("eps", 1e-8)),
        weight_decay=float(g.get("weight_decay", 0.1)), decay_norms_and_biases=len(groups) < 2, min_lr=0.0)
    cfg = Config(model=ck.config, parallel=ParallelConfig(tp=tp, pp=pp), training=training,
                 data=DataConfig(tokenizer=trainer.get("tokenizer")))
    cfg.validate()
    grid = ProcessGrid(tp, pp)
    engine = build_engine(cfg, grid, total_steps=max(1, int(trainer.get("step", 0))))
    consumed = load_into_engine(engine, grid, cfg, ck, source)
    step = engine.global_steps
    client = {**checkpointing.client_state(cfg, grid, step, consumed,
                                           checkpointing.universal_checkpoint_info(cfg, grid.tp_size),
                                           trainer.get("valid")),
              "converted_from": ck.source or source}
    checkpointing.save(engine, out, step, client, keep_last=0)


def write(source: str | Path, output: str | Path, tp: int, pp: int, dp: int, precision: str,
          force: bool = False) -> Path:
    """`source` is a consolidated directory on disk (each process reads it)."""
    output = Path(output)
    world = tp * pp * dp
    with writing(output, force) as tmp:
        torch.multiprocessing.spawn(_worker, args=(world, free_port(), str(source), str(tmp), tp, pp, precision),
                                    nprocs=world, join=True)
    return output
