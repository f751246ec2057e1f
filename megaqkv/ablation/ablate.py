"""tools/ablate.py: one pretraining per attention variant on identical data, seed, token budget and schedule,
each into <dir>/<variant>/, then the comparison table and figures (compare.py).

    python tools/ablate.py [VARIANT ...] --dir DIR -- PRETRAIN_ARGS
    torchrun --nproc_per_node 2 tools/ablate.py qkv kv --dir runs/ab -- --model-config model_configs/cpu_qkv.yaml
    launch.sh ablate qkv kv --dir runs/ab -- PRETRAIN_ARGS

A VARIANT is a preset of megaqkv.variants (qkv, qk, kv, k, gqa4, gqa8, mqa, qgqa4, qgqa8, qmqa; default: the
paper's 300M set) applied to the model of --model-config; `PRESET@SEED` trains it again with another
training.seed into <dir>/<PRESET>_seed<SEED>/, to measure seed noise; every seed is validated on the same samples
(eval.seed pinned to the base seed's). Every variant is configured, and every
mistake reported, before the first one trains; they then train one after another in one process group under
whichever launcher started the script (as pretrain.py: deepspeed, torchrun, srun, mpirun or plain python).
Running the same command again skips finished variants and resumes an interrupted one from its checkpoint; a
directory holding a run of other settings is an error naming what differs.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, parse_override
from ..data.indexed import DataError
from ..parallel.launcher_env import launcher_rank, map_launcher_env
from ..training import pretrain
from ..variants import PRESETS, paper_name
from . import compare, runs

PAPER_300M = ("qkv", "qk", "kv", "k", "gqa4", "mqa", "qgqa4", "qmqa")
# Set per variant by the ablation itself, so not accepted among the pretrain.py arguments.
RESERVED = ("model.sharing", "model.num_kv_heads", "checkpoint.dir", "logging.tensorboard_dir")


@dataclass(frozen=True)
class Variant:
    preset: str
    seed: int | None = None

    @property
    def name(self) -> str:
        return self.preset if self.seed is None else f"{self.preset}_seed{self.seed}"

    def overrides(self, directory: Path, eval_seed: int | None) -> list[str]:
        """The variant's keys, its own log directory (whatever a config file says: two variants must never share
        one), its training seed, and one validation sample order for every seed."""
        sharing, kv_heads = PRESETS[self.preset]
        return ([f"model.sharing={sharing}", f"model.num_kv_heads={'null' if kv_heads is None else kv_heads}",
                 f"logging.tensorboard_dir={directory / self.name / 'tensorboard'}"]
                + ([] if eval_seed is None else [f"eval.seed={eval_seed}"])
                + ([] if self.seed is None else [f"training.seed={self.seed}"]))


def parse_variant(text: str) -> Variant:
    preset, _, seed = text.partition("@")
    if preset not in PRESETS:
        raise ConfigError(f"variant {text!r}: unknown preset {preset!r}; use one of {', '.join(PRESETS)}, "
                          "optionally with @SEED (qkv@4321)")
    if seed and not seed.isdigit():
        raise ConfigError(f"variant {text!r}: the seed after @ must be a non-negative integer")
    return Variant(preset, int(seed) if seed else None)


def configure(variants: list[Variant], pre: argparse.Namespace, directory: Path) -> list[Config]:
    """One resolved config per variant: the pretrain.py arguments plus the variant's keys and its directory."""
    if pre.save is not None:
        raise ConfigError(f"--save {pre.save}: the ablation trains each variant into --dir/<variant>/; drop --save")
    for text in pre.set:
        key = ".".join(parse_override(text)[0])
        if key in RESERVED:
            raise ConfigError(f"--set {text}: the ablation sets {key} for each variant; drop it (the model's shape "
                              "comes from --model-config, the variant from the VARIANT list)")
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"variant {repeated[0]} is listed twice; list each variant once")

    def resolve(v: Variant, eval_seed: int | None) -> Config:
        args = copy.copy(pre)
        args.set, args.save = list(pre.set) + v.overrides(directory, eval_seed), str(directory / v.name)
        try:
            return pretrain.configure(args)
        except (ConfigError, DataError) as exc:
            raise type(exc)(f"variant {v.name}: {exc}") from None

    base = resolve(Variant(variants[0].preset), None)  # the seeds the pretrain.py arguments give
    seed = base.eval.seed if base.eval.seed is not None else base.training.seed
    return [resolve(v, seed) for v in variants]


def state(cfg: Config) -> str:
    """'new', 'unfinished' or 'finished' for the run directory of `cfg`; a run of other settings there is an
    error, since resuming or skipping it would put another experiment into the table."""
    directory = Path(cfg.checkpoint.dir)
    try:
        run = runs.load(directory)
    except runs.RunError:
        return "new"  # nothing readable yet: the training loop decides about any checkpoint there
    ours, theirs = runs.experiment_keys(cfg.to_dict()), run.experiment()
    differs = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differs:
        raise ConfigError(f"{directory} holds a run with other settings: " + ", ".join(
            f"{k} is {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differs[:5])
            + ("" if len(differs) <= 5 else f" and {len(differs) - 5} more") + "; run the ablation with its "
            "settings, or use another --dir")
    return "finished" if run.finished else "unfinished"


def budget_line(cfg: Config, count: int, directory: Path) -> str:
    from ..training.loop import total_steps

    t = cfg.training
    steps = total_steps(cfg)
    return (f"ablation: {count} variant(s) into {directory}, each {steps:,} steps × {t.global_batch_size} × "
            f"{t.seq_length} = {steps * t.global_batch_size * t.seq_length:,} tokens, {t.lr_schedule} LR "
            f"{t.lr:g}→{t.min_lr:g} after {t.warmup_steps} warmup steps, seed {t.seed}")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="ablate.py", usage="%(prog)s [VARIANT ...] --dir DIR [--format text|markdown|json] -- PRETRAIN_ARGS",
        description="Train attention variants on identical data, seed, token budget and schedule, then compare.")
    parser.add_argument("variants", nargs="*", default=list(PAPER_300M),
                        help=f"presets ({', '.join(PRESETS)}), PRESET@SEED for another seed; default: "
                             f"{' '.join(PAPER_300M)}")
    parser.add_argument("--dir", required=True, type=Path, help="one run per variant goes to DIR/<variant>/")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text",
                        help="how the final table is printed (DIR/comparison.md and .json are always written)")
    # deepspeed's launcher puts --local_rank=N before the script's arguments; the rank comes from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    if "--" not in argv:
        parser.error("give the pretrain.py arguments after --, e.g. -- --model-config model_configs/cpu_qkv.yaml "
                     "--data-path PREFIX")
    cut = argv.index("--")
    return parser.parse_args(argv[:cut]), pretrain.parse_args(argv[cut + 1:])


def main(argv: list[str] | None = None) -> int:
    args, pre = parse_args(sys.argv[1:] if argv is None else argv)
    rank0 = launcher_rank() == "0"
    say = (lambda *a: print(*a, flush=True)) if rank0 else (lambda *a: None)
    try:
        launched = map_launcher_env()
        if launched:
            say(launched)
        variants = [parse_variant(v) for v in args.variants]
        configs = configure(variants, pre, args.dir)
        states = [state(cfg) for cfg in configs]
    except (ConfigError, DataError) as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    say(budget_line(configs[0], len(variants), args.dir))
    code, started = 0, False
    for i, (v, cfg, st) in enumerate(zip(variants, configs, states), 1):
        label = f"{v.name} ({paper_name(cfg.model.sharing, cfg.model.num_heads, cfg.model.kv_heads)})"
        if st == "finished":
            say(f"== {i}/{len(variants)} {label}: finished in {cfg.checkpoint.dir}, skipped")
            continue
        say(f"== {i}/{len(variants)} {label} -> {cfg.checkpoint.dir}" + (" (resuming)" if st == "unfinished" else ""))
        started = True
        rc, result = pretrain.train(cfg, pre.ds_config, rank0)
        if rc == 2:
            pretrain.leave_process_group()
            return 2
        if rc == 1:
            code = 1
            say(f"== {label} stopped with the error above; the other variants go on")
        elif result["reason"] not in ("finished", "already finished"):
            say(f"== ablation stopped during {label} ({result['reason']}); run the same command again to continue")
            pretrain.leave_process_group()
            return 0
    if started:
        pretrain.leave_process_group()
    if rank0:
        compare.report([args.dir], args.format, args.dir)  # every run there: earlier variants and seeds too
    return code
