"""Any checkpoint format -> consolidated -> a ready model (at any TP rank, device and dtype)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..model import GPT
from ..parallel.grid import SINGLE, TPGroup
from ..parallel.sharding import shard_from_canonical
from . import consolidated, deepspeed_format, hf, paper, universal
from .consolidated import CheckpointError, Consolidated

FORMATS = ("deepspeed", "consolidated", "paper", "hf", "hf-gpt2")  # hf: the native model; either HF kind reads
READABLE = (*FORMATS, "universal")  # DeepSpeed's universal checkpoints (ds_to_universal output) are read only


def detect(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if consolidated.is_consolidated(path):
        return "consolidated"
    if hf.is_hf(path):
        return "hf"
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        return "paper"
    if universal.is_universal(path):  # before deepspeed: a universal folder holds DeepSpeed's model states too
        return "universal"
    if deepspeed_format.is_deepspeed(path):
        return "deepspeed"
    raise CheckpointError(f"{path}: cannot tell its format; pass --from ({', '.join(READABLE)})")


def read(path: Path, fmt: str, tag: str | None = None, with_optimizer: bool = True, log=print) -> Consolidated:
    if fmt == "consolidated":
        return consolidated.load(path, with_optimizer, lazy=True)
    if fmt == "deepspeed":
        return deepspeed_format.read(path, tag, with_optimizer, log)
    if fmt == "universal":
        return universal.read(path, tag, with_optimizer)
    if fmt == "paper":
        return paper.read(path)
    return hf.read(path, log)


def build_model(ck: Consolidated, tp: TPGroup = SINGLE, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> GPT:
    """The plain model (this TP rank's shards) holding a checkpoint's weights, in eval mode. The attention
    kernel is chosen for this machine (`auto`), not the one the checkpoint was trained with."""
    with torch.device("meta"):
        model = GPT(dataclasses.replace(ck.config, attention_backend="auto"), tp=tp)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shard_from_canonical(name, ck.weights.__getitem__, ck.config, tp.size, tp.rank).to(dtype))
    return model.eval()


def load_model(path: str | Path, fmt: str | None = None, tp: TPGroup = SINGLE, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, log=print) -> tuple[GPT, Consolidated]:
    """Any checkpoint format -> (model, its consolidated form without optimizer state)."""
    path = Path(path)
    ck = read(path, fmt or detect(path), with_optimizer=False, log=log)
    return build_model(ck, tp, device, dtype), ck
