"""DeepSpeed universal checkpoints (what `python -m deepspeed.checkpoint.ds_to_universal` writes), read as
canonical tensors.

A universal folder holds, for every parameter of the pipeline module, `zero/<name>/{fp32,exp_avg,exp_avg_sq,
step}.pt`: the tensor merged over TP ranks and ZeRO partitions and stripped of vocabulary padding, as the
`universal_checkpoint_info` of our checkpoints tells the converter. Beside them lie `zero/optimizer_state.pt`
and copies of the `mp_rank_XX_model_states.pt` files with our client state. The tensors are layout-free; their
names are not: with fewer KV heads than TP ranks (MQA, Q-MQA) the attention has a query projection `q_proj` and
a replicated K/V projection `kv_proj`, where at TP <= num_kv_heads one fused `in_proj` holds the same rows.
DeepSpeed's own loader finds tensors by name, so it resumes such a folder only at layouts with the same names;
mapped to canonical tensors (`parallel/sharding.py`) it loads at any layout. Files are read with `safe_load`
(weights_only). DeepSpeed's converter records no checksums: completeness and safety are checked, a flipped
bit inside a tensor cannot be.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model.pipeline import plain_name
from ..parallel.sharding import ShardSpec, canonical_from_full, param_spec
from .consolidated import STATE_KEYS, CheckpointError, Consolidated
from .deepspeed_layout import (UnsafeCheckpointError, client_state_of, model_config_of, safe_load,
                               trainer_state)

LATEST = "latest_universal"
PER_PARAMETER = ("fp32", *STATE_KEYS, "step")  # the files of every zero/<name>/ folder (AdamW)
CONVERT_HINT = ("python -m deepspeed.checkpoint.ds_to_universal --input_folder <checkpoints>/global_stepN "
                "--output_folder <universal>/global_stepN")


def _is_tag(path: Path) -> bool:
    return (path / "zero").is_dir()


def is_universal(path: Path) -> bool:
    """A universal tag folder, or a folder holding them (with or without `latest_universal`)."""
    return path.is_dir() and (_is_tag(path) or (path / LATEST).is_file()
                              or any(_is_tag(p) for p in path.iterdir() if p.is_dir()))


def locate(path: str | Path, tag: str | None = None) -> Path:
    """The universal tag folder: `path` itself, `path/<tag>`, what `path/latest_universal` names, or the only
    one under `path`. A folder the converter did not finish (a parameter without its files, no model states) is
    refused, naming what is missing."""
    path = Path(path)
    name = None
    if not _is_tag(path):
        name = tag or ((path / LATEST).read_text().strip() if (path / LATEST).is_file() else None)
        if name is None:
            found = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_tag(p)) if path.is_dir() else []
            if len(found) > 1:
                raise CheckpointError(f"{path}: no {LATEST} file and {len(found)} universal checkpoint folders "
                                      f"({', '.join(found)}); name one, e.g. {path / found[-1]}")
            name = found[0] if found else None
    tag_dir = path / name if name else path
    if not _is_tag(tag_dir):
        raise CheckpointError(f"{tag_dir}: not a DeepSpeed universal checkpoint (no zero/ folder); write one with "
                              f"{CONVERT_HINT}")
    missing = [f"{tag_dir / 'zero' / folder / f}.pt" for folder in sorted(parameter_names(tag_dir))
               for f in PER_PARAMETER if not (tag_dir / "zero" / folder / f"{f}.pt").is_file()]
    missing += [str(tag_dir / f) for f in ("mp_rank_00_model_states.pt", "zero/optimizer_state.pt")
                if not (tag_dir / f).is_file()]
    if missing:
        raise CheckpointError(f"{tag_dir}: incomplete universal checkpoint (the conversion did not finish?): "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing; convert again "
                              f"with {CONVERT_HINT}")
    return tag_dir


def parameter_names(tag_dir: Path) -> set[str]:
    """The pipeline-module parameter names the folder holds."""
    return {p.name for p in (tag_dir / "zero").iterdir() if p.is_dir()}


def problems(tag_dir: Path, share: tuple[int, int] = (0, 1)) -> list[tuple[str, str]]:
    """Files that are not plain data, as (kind, message) like deepspeed_layout.verify: 'unsafe' (would need
    Python objects unpickled) or 'damaged' (not a readable torch file). `share` = (rank, world) checks every
    world-th file, so that the ranks of a job check a large folder together."""
    names = sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*.pt"))
    rank, world = share
    found = []
    for name in names[rank::world]:
        try:
            safe_load(tag_dir / name, mmap=True)
        except UnsafeCheckpointError as exc:
            found.append(("unsafe", str(exc)))
        except CheckpointError as exc:
            found.append(("damaged", str(exc)))
    return found


def _full(path: Path, mmap: bool = False) -> torch.Tensor:
    state = safe_load(path, mmap=mmap)
    if not isinstance(state, dict) or not isinstance(state.get("param"), torch.Tensor):
        raise CheckpointError(f"{path}: not a universal checkpoint tensor (no 'param' in it)")
    return state["param"]


class StateTensors(Mapping):
    """Canonical tensors of one state ('fp32' master weights, 'exp_avg', 'exp_avg_sq') of a universal folder,
    read when used. The last parameter file read is kept: the roles of a fused projection come from one file."""

    def __init__(self, tag_dir: Path, key: str, cfg: ModelConfig):
        self._zero, self._key, self._cfg = tag_dir / "zero", key, cfg
        self._sources: dict[str, tuple[str, ShardSpec]] = {}
        for folder in sorted(parameter_names(tag_dir)):
            try:
                spec = param_spec(plain_name(folder, cfg), cfg, 1)
            except (ValueError, KeyError):
                raise CheckpointError(f"{self._zero / folder}: not a parameter of a megaqkv model") from None
            self._sources.update((name, (folder, spec)) for name in spec.canonical)
        self._last: tuple[str | None, dict] = (None, {})

    def _path(self, folder: str) -> Path:
        return self._zero / folder / f"{self._key}.pt"

    def __getitem__(self, name: str) -> torch.Tensor:
        folder, spec = self._sources[name]
        if self._last[0] != folder:
            self._last = (folder, canonical_from_full(spec, _full(self._path(folder)).float(), self._cfg))
        return self._last[1][name]

    def __contains__(self, name) -> bool:
        return name in self._sources

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        folder, spec = self._sources[name]
        meta = torch.empty(_full(self._path(folder), mmap=True).shape, device="meta")
        return tuple(canonical_from_full(spec, meta, self._cfg)[name].shape)


def fill(ck: Consolidated, tag_dir: Path, with_optimizer: bool, lazy: bool) -> None:
    """Set `ck`'s weights to a universal folder's fp32 master weights and, `with_optimizer`, its Adam moments,
    optimizer step and hyper-parameters. `lazy=False` reads everything now (the folder may be temporary)."""
    keys = ("fp32", *STATE_KEYS) if with_optimizer else ("fp32",)
    states = {k: StateTensors(tag_dir, k, ck.config) for k in keys}
    if not lazy:
        states = {k: dict(v) for k, v in states.items()}
    ck.weights = states.pop("fp32")
    ck.optimizer = states
    if with_optimizer:
        first = next(iter(sorted(parameter_names(tag_dir))))
        step = safe_load(tag_dir / "zero" / first / "step.pt")
        common = safe_load(tag_dir / "zero" / "optimizer_state.pt")
        ck.trainer["optimizer_step"] = float(step)
        ck.trainer["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in common["param_groups"]]


def read(path: str | Path, tag: str | None = None, with_optimizer: bool = True) -> Consolidated:
    """A universal folder as a (lazy) consolidated checkpoint with the training position of its client state."""
    tag_dir = locate(path, tag)
    client = client_state_of(tag_dir)
    ck = Consolidated(model_config_of(tag_dir, client), {}, source=f"universal:{tag_dir}")
    ck.trainer = trainer_state(client)
    fill(ck, tag_dir, with_optimizer, lazy=True)
    ck.check(str(tag_dir))
    return ck
