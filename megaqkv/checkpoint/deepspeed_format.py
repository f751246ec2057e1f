"""DeepSpeed training checkpoints (our pipeline engine's layout) -> consolidated, read offline.

Weights come from the per-layer, per-TP-rank files (`layer_XX-model_YY-model_states.pt`), merged
by each parameter's layout (`parallel/sharding.py`). The optimizer state (with the fp32 master
weights), which ZeRO-1 keeps as flat partitions per DP rank, is first turned into one file per
parameter by DeepSpeed's own offline tool (`deepspeed.checkpoint.ds_to_universal`, driven by the
`universal_checkpoint_info` our checkpoints carry), then read like any universal folder
(`checkpoint/universal.py`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..model.pipeline import plain_name
from ..parallel.sharding import canonical_from_shards
from . import universal
from .consolidated import CheckpointError, Consolidated
from .deepspeed_layout import (MARKER, TAG, client_state_of, complete_tags, describe, model_config_of, safe_load,
                               trainer_state, verify)


def is_deepspeed(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("mp_rank_*_model_states.pt")) or (path / "latest").is_file()
                              or any(TAG.match(p.name) for p in path.iterdir()))


def locate(path: str | Path, tag: str | None = None) -> Path:
    """The tag directory to read: `path` itself, `path/<tag>`, or what `path/latest` names. Incomplete
    checkpoints (no completion marker: the run died while saving) and damaged ones (a file that differs from its
    recorded checksum, or a .pt that needs more than plain data unpickled) are refused with the alternative."""
    path = Path(path)
    if any(path.glob("mp_rank_*_model_states.pt")):
        tag_dir = path
    else:
        name = tag or ((path / "latest").read_text().strip() if (path / "latest").is_file() else None)
        if name is None:
            tags = complete_tags(path)
            if not tags:
                raise CheckpointError(f"{path}: no checkpoint here (no 'latest' and no complete global_stepN)")
            name = tags[-1]
        tag_dir = path / name
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: no such checkpoint directory")
    if not (tag_dir / MARKER).is_file():
        others = [t for t in complete_tags(tag_dir.parent) if t != tag_dir.name]
        raise CheckpointError(f"{tag_dir}: incomplete checkpoint (no {MARKER}: the run stopped while saving it)"
                              + (f"; the newest complete one is {tag_dir.parent / others[-1]}" if others else ""))
    problems = verify(tag_dir)
    if problems:
        raise CheckpointError(f"{tag_dir}: {'unsafe' if any(k == 'unsafe' for k, _ in problems) else 'damaged'} "
                              f"checkpoint: {describe(problems)}")
    return tag_dir


def read(path: str | Path, tag: str | None = None, with_optimizer: bool = True, log=print,
         fp32: bool = False) -> Consolidated:
    """`with_optimizer`: the fp32 master weights and Adam moments from the optimizer files; `fp32`: the master
    weights alone. Otherwise the weights of the per-layer files, in the precision training ran in."""
    tag_dir = locate(path, tag)
    client = client_state_of(tag_dir)
    cfg = model_config_of(tag_dir, client)
    tp = client["layout"]["tp"]
    layers = cfg.num_layers + (3 if cfg.tie_embeddings else 4)  # wte, wpe, blocks, ln_f[, untied head]
    files = {(idx, rank): tag_dir / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt"
             for idx in range(layers) for rank in range(tp)}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise CheckpointError(f"{tag_dir}: missing shard files {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                              f"(TP={tp}); the checkpoint is incomplete or was copied partly")
    ck = Consolidated(cfg, {}, source=f"deepspeed:{tag_dir}")
    ck.trainer = trainer_state(client)
    if (with_optimizer or fp32) and any(tag_dir.glob("*optim_states.pt")):
        _read_optimizer(tag_dir, ck, with_optimizer, log)
        return ck
    for idx in range(layers):
        states = [safe_load(files[idx, rank]) for rank in range(tp)]
        for key in states[0]:
            plain = plain_name(f"{idx}.{key}", cfg)
            ck.weights.update(canonical_from_shards(plain, [s[key] for s in states], cfg))
    return ck


def _read_optimizer(tag_dir: Path, ck: Consolidated, with_optimizer: bool, log) -> None:
    """fp32 master weights (and Adam moments) through DeepSpeed's ds_to_universal (which unpickles with
    weights_only=False: `locate` has already refused any .pt that needs more than plain data)."""
    with tempfile.TemporaryDirectory(prefix="megaqkv-universal-") as tmp:
        out = Path(tmp) / tag_dir.name
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        log(f"reading optimizer state with DeepSpeed's ds_to_universal ({tag_dir.name})")
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode:
            raise CheckpointError(f"{tag_dir}: DeepSpeed's ds_to_universal failed on the optimizer files:\n"
                                  f"{result.stderr[-2000:]}\npass --weights-only to take the weights alone")
        universal.fill(ck, out, with_optimizer, lazy=False)
