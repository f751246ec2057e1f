"""pretrain.py: command line, config resolution and checks before any process group starts.

    deepspeed --num_gpus 8 pretrain.py --model-config model_configs/1.2B_qmqa.yaml [--train-config ...]
        [--data-path [W] PREFIX ...] [--tp N] [--pp N] [--sp N] [--ds-config FILE] [--save DIR] [--set KEY=VALUE ...]

Also runs under torchrun, or as plain `python pretrain.py` (one process). Every mistake in the
configuration, the batch arithmetic or the data paths is reported before training starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from ..config import Config, ConfigError, load_config
from ..data.indexed import DataError
from ..parallel.launcher_env import launcher_rank, map_launcher_env
from .data import check_data
from .engine import deepspeed_config, derive_batch, read_ds_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = REPO_ROOT / "train_configs"


def default_train_config(model_config: Path) -> Path:
    """train_configs/<scale>.yaml for model_configs/<scale>_<preset>.yaml."""
    scale = model_config.stem.split("_")[0]
    path = TRAIN_CONFIGS / f"{scale}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TRAIN_CONFIGS.glob("*.yaml"))
        raise ConfigError(f"{model_config}: no training config for scale '{scale}' (known: {', '.join(known)}); "
                          "pass --train-config")
    return path


def resolve(cfg: Config, world_size: int, model_config: Path) -> None:
    """Fill what the config leaves to be derived (batch sizes, directories); reject what cannot run."""
    t = cfg.training
    batch = derive_batch(t, cfg.parallel.data_parallel_size(world_size))
    t.global_batch_size, t.gradient_accumulation_steps = batch.global_batch_size, batch.gradient_accumulation_steps
    if not t.train_tokens and not t.train_steps:
        raise ConfigError("training: set training.train_tokens (the paper: 10,000,000,000) or training.train_steps")
    if cfg.checkpoint.save and cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = str(Path("checkpoints") / model_config.stem)
    if cfg.logging.tensorboard_dir is None and cfg.checkpoint.dir:
        cfg.logging.tensorboard_dir = str(Path(cfg.checkpoint.dir) / "tensorboard")


def _number_or_text(item: str):
    try:
        return float(item)
    except ValueError:
        return item


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="pretrain.py", description="Pretrain a megaqkv model with DeepSpeed.")
    parser.add_argument("--model-config", required=True, type=Path, help="model_configs/<scale>_<preset>.yaml")
    parser.add_argument("--train-config", type=Path, help="default: train_configs/<scale>.yaml (the paper's recipe)")
    parser.add_argument("--data-path", nargs="+", help="training prefixes, optionally weighted: 0.7 A 0.3 B")
    parser.add_argument("--valid-data-path", nargs="+", help="validation prefixes (default: a split of --data-path)")
    parser.add_argument("--tp", type=int, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size")
    parser.add_argument("--sp", type=int, help="sequence-parallel size (DeepSpeed-Ulysses)")
    parser.add_argument("--ds-config", help="DeepSpeed JSON (default ds_configs/zero1_bf16.json)")
    parser.add_argument("--save", help="checkpoint directory (resumed from when it holds a checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set training.lr=3e-4 (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def configure(args) -> Config:
    overrides = list(args.set)
    for flag, key in (("data_path", "data.path"), ("valid_data_path", "data.valid_path")):
        if getattr(args, flag):
            overrides.append(f"{key}={json.dumps([_number_or_text(x) for x in getattr(args, flag)])}")
    for flag, key in (("tp", "parallel.tp"), ("pp", "parallel.pp"), ("sp", "parallel.sp"), ("save", "checkpoint.dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    train_config = args.train_config or default_train_config(args.model_config)
    cfg = load_config(args.model_config, train_config, overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolve(cfg, world, args.model_config)
    deepspeed_config(cfg, derive_batch(cfg.training, cfg.parallel.data_parallel_size(world)),
                     *read_ds_config(args.ds_config))
    check_data(cfg)
    return cfg


def train(cfg: Config, ds_config: str | None, rank0: bool) -> tuple[int, dict | None]:
    """Print the resolved configuration, join the process group (once per process) and train:
    (exit code, the loop's result or None). tools/ablate.py calls it once per variant in one process group."""
    if rank0:
        print("resolved configuration:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), flush=True)
    from ..checkpoint.consolidated import CheckpointError
    from ..parallel import init_distributed
    from .loop import TrainingError, run

    init_distributed(timeout_s=cfg.parallel.collective_timeout_s)
    try:
        return 0, run(cfg, ds_config, log=lambda *a: print(*a, flush=True))
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1, None


def leave_process_group() -> None:
    """Tear the process group down before the interpreter does: gloo's threads destroyed at exit can abort the
    process ("terminate called without an active exception", exit -6) after a complete, saved run."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    rank0 = launcher_rank() == "0"
    try:
        launched = map_launcher_env()  # srun/mpirun: before configure reads WORLD_SIZE
        if launched and rank0:
            print(launched, flush=True)
        cfg = configure(args)
    except (ConfigError, DataError) as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    code, _ = train(cfg, args.ds_config, rank0)
    if code == 0:
        leave_process_group()
    return code
