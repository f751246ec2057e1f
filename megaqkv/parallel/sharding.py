"""How each local (tensor-parallel) parameter relates to the canonical per-role tensors.

Canonical names are the consolidated checkpoint's (DESIGN §6): `wte.weight` without padding,
`layers.3.attn.q.weight` / `k` / `v` / `kv` / `qk` / `qkv` per role, and otherwise the
model's own names. One table (`param_spec`) says, for a parameter of the plain model at a
given TP size, which canonical tensors it holds, how they are fused or padded into one full
tensor, and along which dimension that full tensor is split across TP ranks. Everything else
— TP-independent initialisation, gathering shards, consolidating and resharding — uses it.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..variants import AttentionLayout, fuse_groups, split_groups
from .grid import TPGroup
from .layers import padded_vocab_size


@dataclass(frozen=True)
class ShardSpec:
    canonical: tuple[str, ...]  # canonical tensors held (several when roles are fused)
    dim: int | None  # TP split dimension of the full tensor; None: replicated on every TP rank
    fused: dict | None = None  # roles -> slots, when several role tensors interleave per KV group
    groups: int = 0
    vocab: int = 0  # rows before padding, for vocab-parallel tensors


_ATTN = re.compile(r"^(layers\.\d+\.attn\.)(in_proj|q_proj|kv_proj|out_proj)\.(weight|bias)$")
_COLUMN = re.compile(r"\.mlp\.fc_in\.(weight|bias)$")
_ROW_WEIGHT = re.compile(r"\.mlp\.fc_out\.weight$")


def param_spec(name: str, cfg: ModelConfig, tp_size: int) -> ShardSpec:
    """The spec of the plain-model parameter `name` when the model is built at TP size `tp_size`."""
    layout = AttentionLayout.of(cfg)
    if name in ("wte.weight", "lm_head.weight"):
        return ShardSpec((name,), 0, vocab=cfg.vocab_size)
    m = _ATTN.match(name)
    if m:
        prefix, proj, kind = m.groups()
        if proj == "out_proj":
            return ShardSpec((name,), 1 if kind == "weight" else None)
        if proj == "q_proj":
            return ShardSpec((f"{prefix}q.{kind}",), 0)
        roles = layout.roles() if proj == "in_proj" else layout.kv_roles()
        return ShardSpec(tuple(f"{prefix}{r}.{kind}" for r in roles), 0 if proj == "in_proj" else None,
                         fused=roles, groups=layout.num_kv_heads)
    if _COLUMN.search(name):
        return ShardSpec((name,), 0)
    if _ROW_WEIGHT.search(name):
        return ShardSpec((name,), 1)
    return ShardSpec((name,), None)  # LayerNorms, position embedding, row-parallel biases


def full_from_canonical(spec: ShardSpec, tensors: list[torch.Tensor], cfg: ModelConfig, tp_size: int) -> torch.Tensor:
    if spec.fused:
        roles = dict(zip(spec.fused, tensors))
        return fuse_groups(roles, spec.fused, spec.groups, cfg.head_dim)
    (t,) = tensors
    if spec.vocab and tp_size > 1:
        pad = padded_vocab_size(spec.vocab, tp_size) - t.shape[0]
        t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))])
    return t


def canonical_from_full(spec: ShardSpec, full: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if spec.fused:
        parts = split_groups(full, spec.fused, cfg.head_dim)
        return {name: parts[role] for name, role in zip(spec.canonical, spec.fused)}
    if spec.vocab:
        full = full[:spec.vocab]
    return {spec.canonical[0]: full}


def local_shard(full: torch.Tensor, spec: ShardSpec, tp_size: int, tp_rank: int) -> torch.Tensor:
    if spec.dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=spec.dim)[tp_rank]


def shard_from_canonical(name: str, fetch: Callable[[str], torch.Tensor], cfg: ModelConfig, tp_size: int,
                         tp_rank: int) -> torch.Tensor:
    """This TP rank's value of parameter `name`, built from canonical tensors."""
    spec = param_spec(name, cfg, tp_size)
    full = full_from_canonical(spec, [fetch(c) for c in spec.canonical], cfg, tp_size)
    return local_shard(full, spec, tp_size, tp_rank)


def canonical_from_shards(name: str, shards: list[torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Merge the TP ranks' values of parameter `name` (in rank order) into canonical tensors."""
    spec = param_spec(name, cfg, len(shards))
    full = shards[0] if spec.dim is None else torch.cat(shards, dim=spec.dim)
    return canonical_from_full(spec, full, cfg)


# --------------------------------------------------------------------------- initialisation


def canonical_init(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """DESIGN §1 init of one canonical tensor, from a generator keyed by (seed, name): the same values
    whatever the TP/PP layout or the order in which parameters are built."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if re.search(r"ln_[12f]\.weight$", name):
        return torch.ones(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    return torch.randn(shape, generator=gen) * cfg.init_std


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of the model and its shape."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    layout = AttentionLayout.of(cfg)
    shapes = {"wte.weight": (cfg.vocab_size, h), "wpe.weight": (cfg.max_position_embeddings, h)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "ln_1.weight": (h,), p + "ln_1.bias": (h,), p + "ln_2.weight": (h,), p + "ln_2.bias": (h,)})
        for role, slots in layout.roles().items():
            heads = layout.num_kv_heads * len(slots)
            shapes[f"{p}attn.{role}.weight"] = (heads * d, h)
            if cfg.bias:
                shapes[f"{p}attn.{role}.bias"] = (heads * d,)
        shapes[p + "attn.out_proj.weight"] = (h, h)
        shapes[p + "mlp.fc_in.weight"] = (f, h)
        shapes[p + "mlp.fc_out.weight"] = (h, f)
        if cfg.bias:
            shapes.update({p + "attn.out_proj.bias": (h,), p + "mlp.fc_in.bias": (f,), p + "mlp.fc_out.bias": (h,)})
    shapes.update({"ln_f.weight": (h,), "ln_f.bias": (h,)})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


@torch.no_grad()
def init_parameters(named: Iterable[tuple[str, torch.nn.Parameter]], cfg: ModelConfig, tp: TPGroup,
                    seed: int) -> None:
    """Initialise local parameters (plain-model names) as slices of the TP-independent canonical init."""
    shapes = canonical_shapes(cfg)
    for name, param in named:
        if param.is_meta:
            continue
        value = shard_from_canonical(name, lambda c: canonical_init(c, shapes[c], cfg, seed), cfg, tp.size, tp.rank)
        param.copy_(value)


# --------------------------------------------------------------------------- gathering


def gather_canonical(named: Mapping[str, torch.Tensor], cfg: ModelConfig, tp: TPGroup) -> dict[str, torch.Tensor]:
    """All-gather this stage's local tensors (parameters, or their gradients) over the TP group and return
    them as canonical tensors (on every TP rank)."""
    out = {}
    for name, local in named.items():
        if tp.size > 1 and param_spec(name, cfg, tp.size).dim is not None:
            shards = [torch.empty_like(local) for _ in range(tp.size)]
            dist.all_gather(shards, local.contiguous(), group=tp.group)
        else:
            shards = [local] * tp.size
        out.update(canonical_from_shards(name, shards, cfg))
    return out
