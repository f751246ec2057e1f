"""A training run as the comparison reads it: the rows of its metrics.jsonl and its resolved config.

pretrain.py writes `<logging.tensorboard_dir>/metrics.jsonl` (one line per step, `kind` train or valid) and,
beside it, `run.json` (the resolved config, world size, device). Runs written before run.json existed are read
through the newest complete checkpoint's client state instead, which holds the same config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError, load_section
from ..training.loop import total_steps
from ..training.monitor import RUN_RECORD
from ..variants import PRESETS

METRICS = "metrics.jsonl"
# Keys that say how a run was executed rather than what was trained: runs that differ only in these are the
# same experiment (another layout, checkpoint interval or log cadence trains the same model on the same data).
EXECUTION_KEYS = ("parallel.", "checkpoint.", "logging.", "model.attention_backend", "model.compile",
                  "training.micro_batch_size", "training.gradient_accumulation_steps", "training.exit_after_steps",
                  "training.max_nonfinite_steps", "data.cache_dir", "data.source", "eval.interval", "eval.at_start")
# What makes one variant of an ablation differ from another.
VARIANT_KEYS = ("model.sharing", "model.num_kv_heads")


class RunError(ValueError):
    """A directory that cannot be read as a run; the message names it and says what is missing."""


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def experiment_keys(config: dict) -> dict:
    """The flattened config without EXECUTION_KEYS: what two runs must share to be the same experiment."""
    return {k: v for k, v in flatten(config).items() if not k.startswith(EXECUTION_KEYS)}


@dataclass
class Run:
    path: Path  # the directory named on the command line
    log_dir: Path  # where metrics.jsonl is
    config: Config
    train: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    world_size: int | None = None
    device: str | None = None
    name: str = ""  # how tables and legends call it: the directory's name unless that is ambiguous

    def __post_init__(self):
        self.name = self.name or self.path.name

    @property
    def total_steps(self) -> int:
        return total_steps(self.config)

    @property
    def tokens_per_step(self) -> int:
        return self.config.training.global_batch_size * self.config.training.seq_length

    @property
    def steps_done(self) -> int:
        return self.train[-1]["step"] if self.train else 0

    @property
    def evaluates(self) -> bool:
        """Whether the run validates at all: not when data.split gives validation no share and there is no
        data.valid_path (Megatron's rule, as training/data.py applies it)."""
        return bool(self.config.data.valid_path) or self.config.data.split[1] > 0

    @property
    def finished(self) -> bool:
        """Every step trained and, when the run validates, the final validation written (the loop validates
        after the last step)."""
        steps = self.total_steps
        return self.steps_done >= steps and (not self.evaluates or any(r["step"] >= steps for r in self.valid))

    @property
    def wall_seconds(self) -> float:
        """Training wall time over every start of the run: `elapsed_s` restarts at 0 when a run is resumed, so
        the last value of each stretch is added up (validation inside a stretch is included)."""
        total, last = 0.0, 0.0
        for row in self.train:
            if row["elapsed_s"] < last:
                total += last
            last = row["elapsed_s"]
        return total + last

    def experiment(self) -> dict:
        return experiment_keys(self.config.to_dict())


def find_log_dir(path: Path) -> Path:
    for candidate in (path, path / "tensorboard"):
        if (candidate / METRICS).is_file():
            return candidate
    raise RunError(f"{path}: not a training run: no {METRICS} in it or in {path / 'tensorboard'} (pretrain.py writes "
                   f"<--save directory>/tensorboard/{METRICS}); pass a run's --save directory, or an ablation "
                   "directory whose subdirectories are runs")


def _config_from_checkpoint(path: Path, log_dir: Path) -> dict:
    from ..checkpoint import deepspeed_layout as layout
    from ..checkpoint.consolidated import CheckpointError
    from ..checkpoint.deepspeed_format import client_state_of

    for directory in dict.fromkeys((path, log_dir.parent)):
        tags = layout.complete_tags(directory) if directory.is_dir() else []
        if tags:
            try:
                return {"config": client_state_of(directory / tags[-1])["config"]}
            except CheckpointError as exc:
                raise RunError(f"{path}: no {RUN_RECORD} beside {log_dir / METRICS}, and its checkpoint cannot "
                               f"be read ({exc})") from None
    raise RunError(f"{path}: {log_dir / METRICS} has no {RUN_RECORD} beside it (the resolved config pretrain.py "
                   "writes at start) and no complete checkpoint holds the config; without it the run's data, budget "
                   "and variant are unknown")


def _rows(path: Path) -> list[dict]:
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if row.get("kind") in ("train", "valid") and isinstance(row.get("step"), int):
                rows.append(row)
                continue
        except ValueError:
            if number == len(lines):
                continue  # the last line of a killed run may be cut short
        raise RunError(f"{path}:{number}: not a metrics row ({line[:80]!r}); {METRICS} is written by pretrain.py, "
                       "one JSON object per line with kind train or valid")
    return rows


def load(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a directory; pass a run's --save directory")
    log_dir = find_log_dir(path)
    record_path = log_dir / RUN_RECORD
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else _config_from_checkpoint(path,
                                                                                                          log_dir)
        config = load_section(Config, record["config"], str(record_path))
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise RunError(f"{record_path}: not a readable run record ({exc})") from None
    rows = _rows(log_dir / METRICS)
    return Run(path, log_dir, config, [r for r in rows if r["kind"] == "train"],
               [r for r in rows if r["kind"] == "valid" and isinstance(r.get("loss"), (int, float))],
               record.get("world_size"), record.get("device"))


def _order(path: Path) -> tuple:
    """Ablation subdirectories in the order of megaqkv.variants.PRESETS (qkv first), then other names."""
    preset = path.name.split("_seed")[0]
    return (list(PRESETS).index(preset) if preset in PRESETS else len(PRESETS), path.name)


def expand(paths: list[str | Path]) -> list[Path]:
    """Run directories from the command line: a directory that is no run but holds runs (an ablation's
    <dir>/<variant>/ layout) stands for those runs, in preset order."""
    out = []
    for p in map(Path, paths):
        subs = [] if _is_run(p) or not p.is_dir() else sorted((s for s in p.iterdir() if s.is_dir() and _is_run(s)),
                                                               key=_order)
        out.extend(subs or [p])  # a run, or no runs inside: load() then names what is missing
    return out


def _is_run(path: Path) -> bool:
    try:
        find_log_dir(path)
        return True
    except RunError:
        return False
