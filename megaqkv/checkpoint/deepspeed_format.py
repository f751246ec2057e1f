"""DeepSpeed training checkpoints (our pipeline engine's layout) -> consolidated, read offline.

Weights come from the per-layer, per-TP-rank files (`layer_XX-model_YY-model_states.pt`), merged
by each parameter's layout (`parallel/sharding.py`). The optimizer state, which ZeRO-1 keeps as
flat partitions per DP rank, is first turned into one file per parameter by DeepSpeed's own
offline tool (`deepspeed.checkpoint.ds_to_universal`, driven by the `universal_checkpoint_info`
our checkpoints carry), then mapped to canonical tensors the same way as the weights.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..config import ConfigError, model_config_from_dict
from ..model.pipeline import pipe_name, plain_name
from ..parallel.sharding import canonical_from_full, canonical_from_shards, param_spec
from .consolidated import STATE_KEYS, CheckpointError, Consolidated
from .deepspeed_layout import MARKER, TAG, complete_tags, describe, safe_load, verify


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


def client_state_of(tag_dir: Path) -> dict:
    """What our pretrain.py stored next to DeepSpeed's state (config, layout, position), read safely."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    state = safe_load(path)
    if "config" not in state or "layout" not in state:
        raise CheckpointError(f"{path}: not written by megaqkv's pretrain.py (no config/layout in its client state)")
    return state


def read(path: str | Path, tag: str | None = None, with_optimizer: bool = True, log=print) -> Consolidated:
    tag_dir = locate(path, tag)
    client = client_state_of(tag_dir)
    try:
        cfg = model_config_from_dict(client["config"]["model"], source=f"{tag_dir}/mp_rank_00_model_states.pt")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    tp = client["layout"]["tp"]
    layers = cfg.num_layers + (3 if cfg.tie_embeddings else 4)  # wte, wpe, blocks, ln_f[, untied head]
    files = {(idx, rank): tag_dir / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt"
             for idx in range(layers) for rank in range(tp)}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise CheckpointError(f"{tag_dir}: missing shard files {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                              f"(TP={tp}); the checkpoint is incomplete or was copied partly")
    weights = {}
    for idx in range(layers):
        states = [safe_load(files[idx, rank]) for rank in range(tp)]
        for key in states[0]:
            plain = plain_name(f"{idx}.{key}", cfg)
            weights.update(canonical_from_shards(plain, [s[key] for s in states], cfg))
    ck = Consolidated(cfg, weights, source=f"deepspeed:{tag_dir}")
    training = client["config"].get("training", {})
    ck.trainer = {"step": client.get("global_steps", client.get("iteration", 0)),
                  "consumed_samples": client.get("consumed_samples", 0),
                  "skipped_steps": client.get("skipped_steps", 0),
                  "precision": training.get("precision"),
                  "seq_length": training.get("seq_length"),
                  "tokenizer": client["config"].get("data", {}).get("tokenizer"),
                  "valid": client.get("valid")}
    if with_optimizer and any(tag_dir.glob("*optim_states.pt")):
        _read_optimizer(tag_dir, client, cfg, tp, ck, log)
    return ck


def _read_optimizer(tag_dir: Path, client: dict, cfg, tp: int, ck: Consolidated, log) -> None:
    """fp32 master weights and Adam moments, through DeepSpeed's ds_to_universal (which unpickles with
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
        zero = out / "zero"
        states: dict[str, dict] = {"fp32": {}, **{k: {} for k in STATE_KEYS}}
        step = None
        with torch.device("meta"):
            from ..model import GPT
            from ..parallel.grid import TPGroup

            plain_names = [n for n, _ in GPT(cfg, tp=TPGroup(size=tp)).named_parameters()]
        for plain in plain_names:
            folder = zero / pipe_name(plain, cfg)
            spec = param_spec(plain, cfg, 1)  # universal tensors are merged across TP and unpadded
            for key in states:
                full = torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=True)["param"]
                states[key].update(canonical_from_full(spec, full, cfg))
            if step is None and (folder / "step.pt").is_file():
                step = float(torch.load(folder / "step.pt", map_location="cpu", weights_only=True))
        common = safe_load(zero / "optimizer_state.pt")
    ck.weights = states.pop("fp32")
    ck.optimizer = states
    ck.trainer["optimizer_step"] = step
    ck.trainer["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in common["param_groups"]]
