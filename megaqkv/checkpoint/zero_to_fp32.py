#!/usr/bin/env python
"""megaqkv's zero_to_fp32.py, which our training writes next to every checkpoint in place of DeepSpeed's (same
name, command line and function names, so DeepSpeed's zero_to_torch.py beside it works too):

    python zero_to_fp32.py <checkpoint_dir> <output_dir> [--safe_serialization] [--max_shard_size 5GB] [-t TAG]

DeepSpeed's script cannot read megaqkv checkpoints: the pipeline engine keeps the weights in per-layer files and
leaves `mp_rank_00`'s module empty, the script expects one optimizer file per data-parallel rank (so any TP or PP
layout is refused), and it never merges tensor-parallel shards. This one writes the fp32 master weights merged
over TP, PP and the ZeRO partitions, vocabulary padding removed: the state dict of the plain TP=1
`megaqkv.model.GPT`, in DeepSpeed's output files (`pytorch_model.bin`, or `model.safetensors`; shards and an
index above --max_shard_size), with `megaqkv_model.yaml` to build the model. It needs megaqkv importable; for the
per-role consolidated format or Hugging Face, use tools/convert_ckpt.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

try:  # absolute imports: this file also runs as a script from a checkpoint directory
    from megaqkv.checkpoint import deepspeed_format
    from megaqkv.checkpoint.consolidated import CheckpointError, file_mode
    from megaqkv.checkpoint.loading import build_model
except ImportError as exc:
    sys.exit(f"error: this megaqkv checkpoint's zero_to_fp32.py needs the megaqkv package ({exc}); install it "
             "(pip install -e <megaqkv checkout>) or set PYTHONPATH=<megaqkv checkout>")

OUTPUT_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                      "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
CONFIG_FILE = "megaqkv_model.yaml"
LOAD_HINT = """load it with:
    import {module}, yaml
    from megaqkv.config import model_config_from_dict
    from megaqkv.model import GPT
    model = GPT(model_config_from_dict(yaml.safe_load(open("{out}/{config}"))["model"]))
    model.load_state_dict({load})"""
debug = 0  # set by DeepSpeed's zero_to_torch.py; -d prints every tensor


def _dtype(dtype) -> torch.dtype:
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else dtype
    found = OUTPUT_DTYPE_NAMES.get(name.lower()) if isinstance(name, str) else name
    if found not in OUTPUT_DTYPE_NAMES.values():
        raise ValueError(f"unsupported output dtype {dtype!r}; choose one of {', '.join(sorted(OUTPUT_DTYPE_NAMES))}")
    return found


def _bytes(size) -> int:
    """'5GB' (10^9), '500MiB' (2^20), '1000' -> bytes, as Hugging Face reads --max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"--max_shard_size {size!r}: expected a size such as 5GB, 500MB or 2GiB")
    power = " KMGT".index(m.group(2) or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _fp32_state(checkpoint_dir, tag):
    ck = deepspeed_format.read(checkpoint_dir, tag, with_optimizer=False, fp32=True)
    return {name: p.detach() for name, p in build_model(ck).state_dict().items()}, ck


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None, exclude_frozen_parameters=False,
                                             lazy_mode=False) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 master weights as the state dict of the plain TP=1 GPT (megaqkv has no frozen
    parameters to exclude, and the tensors are always materialised)."""
    return _fp32_state(checkpoint_dir, tag)[0]


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Tensor names in order, cut before a shard would exceed `limit` bytes (a larger tensor gets its own)."""
    shards, size = [[]], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def convert_zero_checkpoint_to_state_dict(checkpoint_dir, output_dir, dtype=torch.float32, max_shard_size="5GB",
                                          safe_serialization=False, tag=None, exclude_frozen_parameters=False):
    """Writes the state dict into `output_dir` (created if needed; other files in it are left alone). Every file
    is written under a temporary name and renamed when complete, the index (when sharded) last."""
    dtype = _dtype(dtype)
    limit = _bytes(max_shard_size)
    print(f"Processing megaqkv checkpoint '{checkpoint_dir}'")
    state, ck = _fp32_state(checkpoint_dir, tag)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if debug:
        for name, t in state.items():
            print(f"{name} {tuple(t.shape)} {t.dtype}")
    print(f"Reconstructed fp32 state dict with {len(state)} params {sum(t.numel() for t in state.values())} "
          f"elements ({ck.source}, step {ck.trainer.get('step')})")
    base, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    shards = _shards(state, limit)
    names = ([f"{base}.{ext}"] if len(shards) == 1 else
             [f"{base}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".zero_to_fp32.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        for file, keys in zip(names, shards):
            part = {k: state[k].contiguous() for k in keys}
            if safe_serialization:
                from safetensors.torch import save_file

                save_file(part, str(tmp / file), metadata={"format": "pt"})
            else:
                torch.save(part, tmp / file)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(
            {"model": asdict(ck.config), "source": ck.source, "step": ck.trainer.get("step")}, sort_keys=False))
        index = None
        if len(shards) > 1:
            index = f"{base}.{ext}.index.json"
            total = sum(t.numel() * t.element_size() for t in state.values())
            weight_map = {k: file for file, keys in zip(names, shards) for k in keys}
            (tmp / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True) + "\n")
        for file in [*names, CONFIG_FILE, *([index] if index else [])]:
            os.chmod(tmp / file, file_mode())
            os.replace(tmp / file, out / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Saved {', '.join(names)}{f' (index {index})' if index else ''} and {CONFIG_FILE} in {out}")
    if len(shards) == 1:
        module, load = (("safetensors.torch", f'safetensors.torch.load_file("{out}/{names[0]}")') if safe_serialization
                        else ("torch", f'torch.load("{out}/{names[0]}", weights_only=True)'))
        print(LOAD_HINT.format(module=module, out=out, config=CONFIG_FILE, load=load))


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_dir, max_shard_size="5GB",
                                               safe_serialization=False, tag=None, exclude_frozen_parameters=False):
    convert_zero_checkpoint_to_state_dict(checkpoint_dir, output_dir, torch.float32, max_shard_size,
                                          safe_serialization, tag, exclude_frozen_parameters)


def main(argv=None) -> int:
    global debug
    p = argparse.ArgumentParser(description="Consolidate a megaqkv (DeepSpeed) checkpoint into the fp32 state dict of "
                                            "the plain megaqkv GPT, merged over TP, PP and ZeRO partitions.")
    p.add_argument("checkpoint_dir", help="the checkpoint folder holding `latest` and global_stepN/ (e.g. '.')")
    p.add_argument("output_dir", help="directory for the state dict files")
    p.add_argument("--max_shard_size", default="5GB", help="largest shard before the state dict is split (5GB)")
    p.add_argument("--safe_serialization", action="store_true", help="write model.safetensors instead of "
                                                                     "pytorch_model.bin")
    p.add_argument("-t", "--tag", help="the global_stepN to read (default: the one `latest` names)")
    p.add_argument("--exclude_frozen_parameters", action="store_true", help="accepted; megaqkv freezes nothing")
    p.add_argument("-d", "--debug", action="store_true", help="print every tensor")
    args = p.parse_args(argv)
    debug = args.debug
    try:
        convert_zero_checkpoint_to_fp32_state_dict(args.checkpoint_dir, args.output_dir, args.max_shard_size,
                                                   args.safe_serialization, args.tag, args.exclude_frozen_parameters)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.output_dir}: cannot write the output ({exc.strerror or exc})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
