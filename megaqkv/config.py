"""Typed configuration: dataclasses loaded from YAML, checked at load time.

Every section is a plain dataclass. `load_section` turns a YAML mapping into one,
rejecting unknown keys and wrong types with the file and the dotted key in the
message; each dataclass's `validate()` then checks the relations between fields.
Command-line overrides (`--set model.num_kv_heads=4`) edit the raw mapping before
it is typed, so they go through exactly the same checks as the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

SHARING_MODES = ("none", "qk", "kv", "qkv")


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message says where and what to do."""


class FieldError(Exception):
    """A bad value at a dotted key, raised by validation; loaders turn it into a ConfigError naming the source."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ModelConfig:
    """GPT-2 shaped decoder; the attention variant is the pair (sharing, num_kv_heads)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    vocab_size: int = 50304
    max_position_embeddings: int = 2048
    sharing: Literal["none", "qk", "kv", "qkv"] = "none"
    # None means one KV head per query head (multi-head attention).
    num_kv_heads: typing.Optional[int] = None
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.1
    layernorm_eps: float = 1e-5
    bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    # math: SDPA's reference kernel only (slow; the exact baseline of bench/gpu_check.sh)
    attention_backend: Literal["auto", "sdpa", "flash", "triton", "math"] = "auto"
    # torch.compile each block in training (fused LayerNorm, bias + GELU, bias + dropout + residual);
    # null: on for CUDA runs, off for CPU runs.
    compile: typing.Optional[bool] = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def validate(self, prefix: str = "model.") -> None:
        for key in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size",
                    "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise FieldError(prefix + key, f"must be a positive integer, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise FieldError(
                prefix + "hidden_size",
                f"{self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                f"pick num_heads from {_divisors(self.hidden_size)[:12]}... or change hidden_size")
        g = self.kv_heads
        if g < 1:
            raise FieldError(prefix + "num_kv_heads", f"must be at least 1, got {g}")
        if self.num_heads % g:
            raise FieldError(
                prefix + "num_kv_heads",
                f"{g} does not divide num_heads={self.num_heads}; "
                f"use one of {_divisors(self.num_heads)}")
        if self.sharing in ("qk", "qkv") and g != self.num_heads:
            raise FieldError(
                prefix + "num_kv_heads",
                f"sharing '{self.sharing}' ties the query and key projections, so there are as many key "
                f"heads as query heads: num_kv_heads must equal num_heads={self.num_heads} (or be left "
                f"unset), got {g}. For fewer KV heads use sharing 'kv' (Q-GQA/Q-MQA) or 'none' (GQA/MQA)")
        for key in ("embedding_dropout", "attention_dropout", "hidden_dropout"):
            p = getattr(self, key)
            if not 0.0 <= p < 1.0:
                raise FieldError(prefix + key, f"must be in [0, 1), got {p}")
        if self.attention_backend == "triton" and self.attention_dropout > 0:
            raise FieldError(prefix + "attention_dropout",
                             f"{self.attention_dropout} needs attention dropout, which the Triton kernel does not "
                             "have (the paper trains with 0): set it to 0, or attention_backend: sdpa")
        for key in ("layernorm_eps", "init_std"):
            if getattr(self, key) <= 0:
                raise FieldError(prefix + key, f"must be positive, got {getattr(self, key)}")


@dataclass
class ParallelConfig:
    """Tensor and pipeline sizes; the data-parallel size is what the world size leaves."""

    tp: int = 1
    pp: int = 1
    # Sequence parallelism (DeepSpeed-Ulysses): each of sp ranks holds a contiguous slice of every sample, and
    # attention exchanges heads for positions; between TP and DP in the rank order.
    sp: int = 1
    activation_checkpointing: bool = False  # recompute each block in backward
    # A collective that waits longer raises, so a stopped rank ends the job instead of hanging it.
    collective_timeout_s: float = 600.0

    def validate(self, prefix: str = "parallel.") -> None:
        for key in ("tp", "pp", "sp"):
            if getattr(self, key) < 1:
                raise FieldError(prefix + key, f"must be at least 1, got {getattr(self, key)}")
        if self.collective_timeout_s <= 0:
            raise FieldError(prefix + "collective_timeout_s", f"must be positive, got {self.collective_timeout_s}")

    def data_parallel_size(self, world: int) -> int:
        """DP of `world` processes (world = TP × SP × PP × DP); a layout that does not fit is a ConfigError."""
        axes = {"tp": self.tp, "sp": self.sp, "pp": self.pp} if self.sp > 1 else {"tp": self.tp, "pp": self.pp}
        size = self.tp * self.sp * self.pp
        if world % size:
            raise ConfigError(f"{' × '.join(f'parallel.{k}={v}' for k, v in axes.items())} = {size} does not divide "
                              f"the {world} launched processes; launch a multiple of {size} processes or change "
                              f"{'/'.join(axes)}")
        return world // size


@dataclass
class TrainingConfig:
    """Batch, precision, optimiser, schedule and stopping (DESIGN §1 holds the paper's values)."""

    micro_batch_size: int = 1
    # Give any two of micro batch, accumulation steps and global batch (with the DP size) and the third
    # is derived; a global batch that disagrees with the others is an error.
    global_batch_size: typing.Optional[int] = None
    gradient_accumulation_steps: typing.Optional[int] = None
    seq_length: typing.Optional[int] = None  # default: model.max_position_embeddings
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 500
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after the linear warmup, down to min_lr
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_biases: bool = True  # the paper decays every parameter; false exempts biases and LayerNorms
    grad_clip: float = 1.0
    skip_grad_norm_above: typing.Optional[float] = 100.0  # skip (and count) a step with a larger gradient norm
    max_nonfinite_steps: int = 10  # stop with an error after this many consecutive steps with a non-finite loss
    train_tokens: typing.Optional[int] = None  # stop after this many tokens (rounded up to whole steps) ...
    train_steps: typing.Optional[int] = None  # ... or after this many steps; set exactly one
    exit_after_steps: typing.Optional[int] = None  # end this invocation (with a checkpoint) after so many steps
    seed: int = 1234

    def validate(self, prefix: str = "training.") -> None:
        for key in ("micro_batch_size", "global_batch_size", "gradient_accumulation_steps", "seq_length",
                    "train_tokens", "train_steps", "exit_after_steps", "max_nonfinite_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise FieldError(prefix + key, f"must be at least 1, got {value}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise FieldError(prefix + "betas", f"expected two numbers in [0, 1), got {self.betas}")
        for key in ("lr", "eps"):
            if getattr(self, key) <= 0:
                raise FieldError(prefix + key, f"must be positive, got {getattr(self, key)}")
        for key in ("weight_decay", "grad_clip", "min_lr", "warmup_steps"):
            if getattr(self, key) < 0:
                raise FieldError(prefix + key, f"must not be negative, got {getattr(self, key)}")
        if self.min_lr > self.lr:
            raise FieldError(prefix + "min_lr", f"{self.min_lr} is above training.lr={self.lr}")
        if self.skip_grad_norm_above is not None and self.skip_grad_norm_above <= 0:
            raise FieldError(prefix + "skip_grad_norm_above", "must be positive, or null to never skip")
        if self.train_tokens is not None and self.train_steps is not None:
            raise FieldError(prefix + "train_steps", "set either training.train_tokens or training.train_steps, "
                                                     "not both")


@dataclass
class DataConfig:
    """Indexed datasets (prefixes of .bin/.idx made by tools/preprocess_data.py)."""

    # As Megatron's --data-path: weights and prefixes in turn, [0.7, a_document, 0.3, b_document], or prefixes alone,
    # blended in proportion to their sizes over one pass each (data/builder.py).
    path: list[typing.Any] = dataclasses.field(default_factory=list)
    # Validation prefixes, as `path`; when empty, validation comes from `split` of `path`.
    valid_path: list[typing.Any] = dataclasses.field(default_factory=list)
    # train/valid/test shares of every prefix of `path`; a validation share of 0 without valid_path: no evaluation
    split: list[float] = dataclasses.field(default_factory=lambda: [969.0, 30.0, 1.0])
    mode: Literal["packed", "document"] = "packed"  # document: one document per sample, padding masked
    cache_dir: typing.Optional[str] = None  # sample-index cache (default: next to the data)
    source: typing.Optional[str] = None  # the corpus the prefixes come from, for the "missing data" hint
    # The tokenizer the data was made with (gpt2, a sentencepiece .model, a HF tokenizer.json): checkpoints record
    # it, `convert_ckpt.py --to hf` ships it with the model, evaluate/generate default to it. None: not stated.
    tokenizer: typing.Optional[str] = None

    def validate(self, prefix: str = "data.") -> None:
        for key in ("path", "valid_path"):
            blend_of(getattr(self, key), prefix + key)
        if self.tokenizer not in (None, "gpt2") and not self.tokenizer.endswith((".model", ".json")):
            raise FieldError(prefix + "tokenizer", f"{self.tokenizer!r} is not gpt2, a sentencepiece .model or a HF "
                                                   "tokenizer.json (the tokenizer tools/preprocess_data.py used)")
        if len(self.split) != 3 or any(r < 0 for r in self.split) or sum(self.split[:1]) <= 0:
            raise FieldError(prefix + "split", f"expected three non-negative ratios (train, valid, test) with a "
                                               f"positive train share, got {self.split}")


def blend_of(items: list, key: str = "data.path") -> tuple[list[str], list[float] | None]:
    """[a, b] -> ([a, b], None);  [0.7, a, 0.3, b] -> ([a, b], [0.7, 0.3]) (as Megatron reads --data-path)."""
    if all(isinstance(i, str) for i in items):
        return list(items), None
    pairs = list(zip(items[::2], items[1::2]))
    if len(items) % 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
                                 and isinstance(p, str) for w, p in pairs):
        raise FieldError(key, f"expected prefixes, or positive weight and prefix in turn (0.7 a 0.3 b), got {items}")
    return [p for _, p in pairs], [float(w) for w, _ in pairs]


@dataclass
class EvalConfig:
    interval: int = 1000  # steps between validation runs (0: only at the end)
    tokens: int = 4_194_304  # validation tokens per run (a fixed set, the same every time)
    at_start: bool = False  # also evaluate before the first step
    # The order the validation samples are cut and drawn in; null: training.seed, as in Megatron. The ablation
    # pins it, so that runs of several training seeds score the same validation samples.
    seed: typing.Optional[int] = None

    def validate(self, prefix: str = "eval.") -> None:
        if self.interval < 0:
            raise FieldError(prefix + "interval", "must not be negative (0: validate only at the end)")
        if self.tokens < 1:
            raise FieldError(prefix + "tokens", "must be positive")
        if self.seed is not None and self.seed < 0:
            raise FieldError(prefix + "seed", "must not be negative (null: training.seed)")


@dataclass
class CheckpointConfig:
    save: bool = True  # false: no checkpoint is written or resumed (benchmarks, checks); no run lock either
    dir: typing.Optional[str] = None  # default: checkpoints/<model config name>
    interval: int = 1000  # steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)
    keep_last: int = 3  # complete checkpoints kept (0: keep all)
    resume: bool = True  # continue from the newest complete checkpoint in `dir`
    load: typing.Optional[str] = None  # start from this checkpoint directory instead (weights + optimizer)

    def validate(self, prefix: str = "checkpoint.") -> None:
        for key in ("interval", "keep_last"):
            if getattr(self, key) < 0:
                raise FieldError(prefix + key, "must not be negative")
        if not self.save and self.dir:
            raise FieldError(prefix + "dir", f"{self.dir} is given, but checkpoint.save is false, so nothing would "
                                             "be written there or resumed from it; drop one of the two")


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between console lines
    tensorboard_dir: typing.Optional[str] = None  # default: <checkpoint.dir>/tensorboard
    peak_tflops: typing.Optional[float] = None  # per device, for MFU; default: known GPUs, or measured on CPU

    def validate(self, prefix: str = "logging.") -> None:
        if self.interval < 1:
            raise FieldError(prefix + "interval", "must be at least 1")


@dataclass
class Config:
    """The root of everything a run is configured by; one attribute per section."""

    model: ModelConfig
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def validate(self, prefix: str = "") -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate(prefix + section.name + ".")
        check_parallel_fits_model(self.model, self.parallel.tp, self.parallel.pp, prefix + "parallel.",
                                  self.parallel.sp)
        if self.training.seq_length is None:
            self.training.seq_length = self.model.max_position_embeddings
        if self.training.seq_length > self.model.max_position_embeddings:
            raise FieldError(prefix + "training.seq_length",
                              f"{self.training.seq_length} exceeds model.max_position_embeddings="
                              f"{self.model.max_position_embeddings}")
        if self.training.seq_length % self.parallel.sp:
            sp = self.parallel.sp
            raise FieldError(prefix + "training.seq_length",
                             f"{self.training.seq_length} is not divisible by parallel.sp={sp}: each sequence-parallel "
                             f"rank holds an equal slice; use {self.training.seq_length // sp * sp} or "
                             f"{(self.training.seq_length // sp + 1) * sp}")

    def to_dict(self) -> dict:
        """Plain data (no dataclasses), safe to store in checkpoints and YAML."""
        return dataclasses.asdict(self)


def check_parallel_fits_model(model: ModelConfig, tp: int, pp: int, prefix: str = "parallel.", sp: int = 1) -> None:
    """TP splits whole query heads and whole KV groups (or replicates KV heads when there are fewer than TP); SP
    then splits each TP rank's query heads, and its KV heads the same way (or sends each rank its group's)."""
    n, g = model.num_heads, model.kv_heads
    if n % tp:
        raise FieldError(prefix + "tp", f"tensor parallel size {tp} must divide num_heads={n}; "
                                         f"use one of {_divisors(n)}")
    if g % tp and tp % g:
        raise FieldError(prefix + "tp", f"tensor parallel size {tp} must divide num_kv_heads={g} or be a "
                                         f"multiple of it (then the KV heads are replicated); "
                                         f"use one of {[t for t in _divisors(n) if g % t == 0 or t % g == 0]}")
    if model.ffn_hidden_size % tp:
        raise FieldError(prefix + "tp", f"tensor parallel size {tp} must divide model.ffn_hidden_size="
                                        f"{model.ffn_hidden_size} (the MLP is split by columns)")
    if pp > model.num_layers:
        raise FieldError(prefix + "pp", f"pipeline size {pp} exceeds num_layers={model.num_layers}")
    heads, kv = n // tp, max(g // tp, 1)  # per TP rank (KV heads replicated when fewer than TP ranks)
    fitting = [s for s in _divisors(heads) if kv % s == 0 or s % kv == 0]
    if heads % sp:
        raise FieldError(prefix + "sp", f"sequence parallel size {sp} must divide the {heads} query heads of each "
                                        f"TP rank (num_heads={n} / tp={tp}); use one of {fitting}")
    if kv % sp and sp % kv:
        raise FieldError(prefix + "sp", f"sequence parallel size {sp} must divide the {kv} KV heads of each TP rank "
                                        f"or be a multiple of them (then each rank receives its group's); use one of "
                                        f"{fitting}")


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except FieldError as exc:
                errors.append(exc)
        if len(errors) == 1:  # Optional[X]: X's own message (e.g. "must be finite") says more
            raise errors[0]
        raise FieldError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise FieldError(key, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise FieldError(key, f"expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise FieldError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise FieldError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise FieldError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def _unknown_key_message(key: str, valid: Sequence[str]) -> str:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key{hint}; valid keys here: {', '.join(valid)}"


def _build(cls: type, data: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(data, Mapping):
        raise FieldError(section, f"expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise FieldError(prefix + str(key), _unknown_key_message(str(key), list(fields)))
    missing = [name for name, f in fields.items()
               if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise FieldError(prefix + missing[0], "required key is missing")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one mapping, which plain YAML loading resolves silently to the last value."""


class Loader(yaml.SafeLoader):
    """SafeLoader for every config read: exponent floats without a dot (`3e-4`, `1e5`, YAML 1.2) are floats,
    not the strings YAML 1.1 makes of them, and a duplicate key is an error instead of silently the last."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in lines:
                    raise DuplicateKeyError(problem=f"duplicate key {key!r} on lines {lines[key]} and {line}; "
                                                    "keep one")
            except TypeError:
                continue  # unhashable: the base class reports it
            lines[key] = line
        return super().construct_mapping(node, deep)


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_bytes().decode("utf-8"), Loader=Loader)
    except (UnicodeDecodeError, yaml.reader.ReaderError):
        raise ConfigError(f"{path}: not a text YAML file (binary or not UTF-8); give a .yaml config") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {exc.problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], value); the value is read as YAML (4, 0.1, true, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, for example --set model.num_kv_heads=4")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = yaml.load(raw, Loader=Loader) if raw.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(f"--set {text}: {exc.problem}") from None
    except yaml.YAMLError:
        value = raw
    return path, value


def _schema_check(cls: type, path: list[str], text: str) -> None:
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {text}: '{'.'.join(path[:i])}' is a value, not a section")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"--set {text}: {'.'.join(path[:i + 1])}: "
                              + _unknown_key_message(part, list(fields)))
        cls = typing.get_type_hints(cls)[part]
        if typing.get_origin(cls) is typing.Union:
            cls = next(a for a in typing.get_args(cls) if a is not type(None))


def apply_overrides(raw: dict, overrides: Sequence[str], schema: type = Config) -> list[str]:
    """Edit the raw mapping in place; return the overrides as applied (for the run log)."""
    applied, given = [], {}
    for text in overrides:
        path, value = parse_override(text)
        _schema_check(schema, path, text)
        for other, first in given.items():
            if path[:len(other)] == list(other) or other[:len(path)] == tuple(path):
                raise ConfigError(f"--set {text}: {'.'.join(other)} is already set by --set {first}; "
                                  "give each key once")
        given[tuple(path)] = text
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section in the loaded config")
        node[path[-1]] = value
        applied.append(f"{'.'.join(path)}={value!r}")
    return applied


def load_section(cls: type, data: Any, source: str, prefix: str = ""):
    """Build and validate one dataclass from a mapping; errors name `source` and the dotted key."""
    try:
        obj = _build(cls, data, prefix)
        obj.validate(prefix)
    except FieldError as exc:
        raise ConfigError(f"{source}: {exc.key}: {exc.message}") from None
    return obj


def load_model_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """A model config file holds the ModelConfig keys at its top level."""
    return load_config(path, overrides=overrides).model


def load_config(model_config: str | Path, run_config: str | Path | None = None,
                overrides: Sequence[str] = ()) -> Config:
    """Model file (flat ModelConfig keys) + optional run file (sections parallel, training, ...) + --set."""
    raw = read_yaml(run_config) if run_config else {}
    if "model" in raw:
        raise ConfigError(f"{run_config}: model: model settings belong in the model config "
                          f"({model_config}); change them there or with --set model.KEY=VALUE")
    raw["model"] = read_yaml(model_config)
    applied = apply_overrides(raw, overrides)
    try:
        cfg = _build(Config, raw, "")
        cfg.validate()
    except FieldError as exc:
        source = str(model_config) if exc.key.startswith("model.") or not run_config else str(run_config)
        touched = [o for o in applied if o.split("=", 1)[0] == exc.key]
        if touched:
            source += f" (with --set {touched[0]})"
        raise ConfigError(f"{source}: {exc.key}: {exc.message}") from None
    return cfg


def model_config_from_dict(data: Mapping[str, Any], source: str = "model config") -> ModelConfig:
    """Rebuild a ModelConfig stored as plain data (checkpoints, consolidated files)."""
    return load_section(ModelConfig, dict(data), source, prefix="model.")
