"""The consolidated checkpoint: the layout-independent hub every conversion goes through.

A directory holding
    config.yaml          the model config (plain data) and where the weights came from
    model.safetensors    one tensor per role, canonical names (`layers.3.attn.kv.weight`, `wte.weight` unpadded)
and, when the training state was carried over,
    optimizer.safetensors  `exp_avg.<name>` / `exp_avg_sq.<name>` in the same canonical layout (fp32)
    trainer_state.json     step, consumed samples, skipped steps, optimizer step count and hyper-parameters
The directory is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ConfigError, ModelConfig, model_config_from_dict
from ..parallel.sharding import canonical_shapes

FORMAT = "megaqkv-consolidated"
STATE_KEYS = ("exp_avg", "exp_avg_sq")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what to do."""


class LazyTensors(Mapping):
    """Tensors of a safetensors file read on access: a process that needs part of a large checkpoint (one
    pipeline stage) reads only that part."""

    def __init__(self, path: Path, prefix: str = ""):
        try:  # safetensors checks the header and that the data covers the file exactly here, not per tensor
            self._file = safe_open(str(path), framework="pt")
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc}); copy or convert it "
                                  "again") from None
        self._prefix = prefix
        self._names = [k[len(prefix):] for k in self._file.keys() if k.startswith(prefix)]
        self._known = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(self._prefix + name)

    def __contains__(self, name) -> bool:
        return name in self._known

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(self._prefix + name).get_shape())


def _shape(tensors: Mapping, name: str) -> tuple[int, ...]:
    """Without reading the tensor where the mapping reads lazily (it has a `shape(name)` method)."""
    return tensors.shape(name) if callable(getattr(tensors, "shape", None)) else tuple(tensors[name].shape)


@dataclass
class Consolidated:
    config: ModelConfig
    weights: Mapping[str, torch.Tensor]
    optimizer: dict[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)  # state key -> canonical tensors
    trainer: dict | None = None  # step, consumed_samples, skipped_steps, optimizer_step, param_groups
    source: str = ""

    def check(self, where: str) -> None:
        """Every canonical tensor of the config is present with its shape, and nothing else."""
        expected = canonical_shapes(self.config)
        missing = sorted(set(expected) - set(self.weights))
        extra = sorted(set(self.weights) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{where}: tensors do not match the model config ({variant_text(self.config)}): "
                                  f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                                  f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}")
        for name, shape in expected.items():
            if _shape(self.weights, name) != shape:
                raise CheckpointError(f"{where}: {name} has shape {_shape(self.weights, name)}, the config "
                                      f"({variant_text(self.config)}) needs {shape}; the checkpoint is of another "
                                      "variant or size")
        for key, tensors in self.optimizer.items():
            if set(tensors) != set(expected):
                raise CheckpointError(f"{where}: optimizer state '{key}' does not cover the same tensors as the weights")


def variant_text(cfg: ModelConfig) -> str:
    from ..variants import paper_name

    return (f"{paper_name(cfg.sharing, cfg.num_heads, cfg.kv_heads)}, {cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_heads} heads, {cfg.kv_heads} KV heads, vocab {cfg.vocab_size}")


def is_consolidated(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "model.safetensors").is_file()


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A failure to write the output `path` (parent is a file, no permission, disk full) becomes a
    CheckpointError naming it and the reason: an OSError, or how safetensors (SafetensorError) and torch.save
    (RuntimeError) report the same I/O errors."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as exc:
        reason = (f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
                  if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0])
        raise CheckpointError(f"{path}: cannot write the output ({reason}); check the location and its free "
                              "space") from None


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def prepare_output(path: Path, force: bool, directory: bool = True) -> Path:
    """A fresh temporary sibling of `path` (a directory, or a file name to write); refuses to replace an
    existing output unless forced."""
    if path.exists() and not force:
        raise CheckpointError(f"{path}: already exists; choose another --output or pass --force to replace it")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    _remove(tmp)
    with _write_errors(path):
        if directory:
            tmp.mkdir(parents=True)
        else:
            tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def file_mode() -> int:
    """The permissions a new file gets under this process's umask (some writers, such as safetensors, narrow
    them to the owner)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def commit_output(tmp: Path, path: Path) -> Path:
    """Rename the finished temporary output into place, its files with the usual umask permissions."""
    mode = file_mode()
    with _write_errors(path):
        for f in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
            if f.is_file():
                os.chmod(f, mode)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    return path


@contextlib.contextmanager
def writing(path: Path, force: bool, directory: bool = True) -> Iterator[Path]:
    """The temporary output for the body to write: renamed into place when the body completes, removed when
    it fails, so a failure midway never leaves a complete-looking output."""
    tmp = prepare_output(path, force, directory)
    try:
        with _write_errors(path):
            yield tmp
        commit_output(tmp, path)
    finally:
        _remove(tmp)


def save(ck: Consolidated, path: str | Path, force: bool = False) -> Path:
    path = Path(path)
    ck.check(str(path))
    with writing(path, force) as tmp:
        meta = {"format": FORMAT, "model": asdict(ck.config), "source": ck.source}
        (tmp / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        save_file({k: v.contiguous() for k, v in ck.weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": FORMAT})
        if ck.optimizer:
            flat = {f"{key}.{name}": t.contiguous() for key, tensors in ck.optimizer.items()
                    for name, t in tensors.items()}
            save_file(flat, str(tmp / "optimizer.safetensors"), metadata={"format": FORMAT})
        if ck.trainer is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(ck.trainer, indent=1))
    return path


def load(path: str | Path, with_optimizer: bool = True, lazy: bool = False) -> Consolidated:
    """`lazy`: tensors are read from disk when first used instead of all at once."""
    path = Path(path)
    if not is_consolidated(path):
        raise CheckpointError(f"{path}: not a consolidated checkpoint (config.yaml + model.safetensors)")
    try:
        meta = yaml.safe_load((path / "config.yaml").read_text())
        cfg = model_config_from_dict(meta["model"], source=str(path / "config.yaml"))
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / 'config.yaml'}: unreadable ({exc})") from None
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    weights = LazyTensors(path / "model.safetensors")
    ck = Consolidated(cfg, weights if lazy else dict(weights), source=meta.get("source", ""))
    if with_optimizer and (path / "optimizer.safetensors").is_file():
        for key in STATE_KEYS:
            state = LazyTensors(path / "optimizer.safetensors", prefix=key + ".")
            ck.optimizer[key] = state if lazy else dict(state)
    if (path / "trainer_state.json").is_file():
        try:
            ck.trainer = json.loads((path / "trainer_state.json").read_text())
        except ValueError as exc:  # not JSON, or not text
            raise CheckpointError(f"{path / 'trainer_state.json'}: unreadable ({exc})") from None
    ck.check(str(path))
    return ck
