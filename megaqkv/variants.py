"""The attention variant arithmetic: one place that knows what (sharing, num_kv_heads) means.

The fused input projection is a stack of KV-group blocks (DESIGN §3). Inside a
block each *slot* is `head_dim` rows; a role (q, k, v) points at slots, and roles
that share a projection point at the same slot:

    sharing  block (slots)          roles
    none     [q * r, k, v]          q: 0..r-1, k: r,  v: r+1
    kv       [q * r, kv]            q: 0..r-1, k = v: r
    qk       [qk, v]     (r = 1)    q = k: 0, v: 1
    qkv      [x]         (r = 1)    q = k = v: 0

with r = num_heads / num_kv_heads query heads per group. A column split of the
fused rows by whole groups therefore hands each tensor-parallel rank complete
groups, and the model, the converters and the analysis all read the layout here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

# preset -> (sharing, num_kv_heads or None for "one per query head")
PRESETS: dict[str, tuple[str, int | None]] = {
    "qkv": ("none", None),
    "qk": ("qk", None),
    "kv": ("kv", None),
    "k": ("qkv", None),
    "gqa4": ("none", 4),
    "gqa8": ("none", 8),
    "mqa": ("none", 1),
    "qgqa4": ("kv", 4),
    "qgqa8": ("kv", 8),
    "qmqa": ("kv", 1),
}


def paper_name(sharing: str, num_heads: int, num_kv_heads: int) -> str:
    """The paper's name for a variant: QKV, Q=K–V, Q–K=V, Q=K=V, GQA-g, MQA, Q-GQA-g, Q-MQA."""
    if sharing == "qk":
        return "Q=K–V"
    if sharing == "qkv":
        return "Q=K=V"
    prefix = "Q-" if sharing == "kv" else ""
    if num_kv_heads == num_heads:
        return "Q–K=V" if sharing == "kv" else "QKV"
    if num_kv_heads == 1:
        return prefix + "MQA"
    return f"{prefix}GQA-{num_kv_heads}"


@dataclass(frozen=True)
class AttentionLayout:
    """Fused-projection layout of one attention layer (all heads, before any TP split)."""

    sharing: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> "AttentionLayout":
        return cls(cfg.sharing, cfg.num_heads, cfg.kv_heads, cfg.head_dim)

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_shared(self) -> bool:
        """Key and value are one tensor (K=V): one cache entry per KV head instead of two."""
        return self.sharing in ("kv", "qkv")

    @property
    def slots_per_group(self) -> int:
        return {"none": self.q_per_group + 2, "kv": self.q_per_group + 1, "qk": 2, "qkv": 1}[self.sharing]

    @property
    def k_slot(self) -> int:
        return {"none": self.q_per_group, "kv": self.q_per_group, "qk": 0, "qkv": 0}[self.sharing]

    @property
    def v_slot(self) -> int:
        return {"none": self.q_per_group + 1, "kv": self.q_per_group, "qk": 1, "qkv": 0}[self.sharing]

    @property
    def rows(self) -> int:
        """Output rows of the fused projection: only what the variant needs."""
        return self.num_kv_heads * self.slots_per_group * self.head_dim

    @property
    def num_projections(self) -> int:
        """Distinct projections, the paper's p: QKV 3, Q=K–V and Q–K=V 2, Q=K=V 1 (GQA/MQA keep 3)."""
        return {"none": 3, "kv": 2, "qk": 2, "qkv": 1}[self.sharing]

    def roles(self) -> dict[str, tuple[int, ...]]:
        """Canonical role name -> slots it occupies in each group block (the consolidated format's names)."""
        r = self.q_per_group
        q = tuple(range(r))
        return {
            "none": {"q": q, "k": (r,), "v": (r + 1,)},
            "kv": {"q": q, "kv": (r,)},
            "qk": {"qk": (0,), "v": (1,)},
            "qkv": {"qkv": (0,)},
        }[self.sharing]

    def kv_roles(self) -> dict[str, tuple[int, ...]]:
        """Roles of the key/value-only block ([k, v] or [kv]) that tensor parallelism replicates when
        there are fewer KV heads than TP ranks."""
        return {"k": (0,), "v": (1,)} if not self.kv_shared else {"kv": (0,)}

    def kv_head_tensors(self) -> int:
        return 1 if self.kv_shared else 2

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Per layer: K and V heads stored for one token (one tensor when K=V)."""
        return self.kv_head_tensors() * self.num_kv_heads * self.head_dim * bytes_per_element

    def tensor_split(self, tp: int) -> "AttentionLayout":
        """What one of `tp` tensor-parallel ranks holds: whole KV groups, or with fewer KV heads than ranks its
        query heads and the (replicated) one group they read."""
        return AttentionLayout(self.sharing, self.num_heads // tp, max(self.num_kv_heads // tp, 1), self.head_dim)

    def sequence_split(self, sp: int) -> tuple["AttentionLayout", list[int] | None]:
        """Ulysses sequence parallelism over `sp` ranks of this (TP-local) layout: the layout each rank attends
        with after the all-to-all of the projection output, and the columns sent to each destination in turn
        (None: consecutive blocks of whole KV groups, a plain split). Only the rows the variant has travel: K=V
        sends [q, kv] per group, Q=K=V one tensor. With fewer KV groups than ranks (sp a multiple of them), each
        destination gets its query heads and a copy of their group's key/value columns, once per rank pair."""
        n, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        if g % sp == 0:
            return AttentionLayout(self.sharing, n // sp, g // sp, d), None
        heads = n // sp
        block = self.slots_per_group * d
        kv_slots = sorted({self.k_slot, self.v_slot})
        columns = []
        for first in range(0, n, heads):
            group, within = divmod(first, self.q_per_group)
            base = group * block
            columns += range(base + within * d, base + (within + heads) * d)
            columns += [base + slot * d + c for slot in kv_slots for c in range(d)]
        return AttentionLayout(self.sharing, heads, 1, d), columns

    def sequence_exchange_elements(self, sp: int, tokens: int) -> tuple[int, int]:
        """Elements one rank sends to the other SP ranks in one layer's forward for `tokens` positions of its
        slice: (the projection output's all-to-all, the attention output's all-to-all back). Backward sends the
        same again (the gradients)."""
        dest, _ = self.sequence_split(sp)
        return (sp - 1) * tokens * dest.rows, (sp - 1) * tokens * dest.num_heads * self.head_dim


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """Whole-model KV cache for one token of context."""
    return cfg.num_layers * AttentionLayout.of(cfg).kv_cache_bytes_per_token(bytes_per_element)


def attention_parameters(cfg: ModelConfig) -> int:
    """Fused input projection plus output projection, all layers, biases included."""
    layout = AttentionLayout.of(cfg)
    bias = 1 if cfg.bias else 0
    per_layer = layout.rows * (cfg.hidden_size + bias) + cfg.hidden_size * (cfg.hidden_size + bias)
    return cfg.num_layers * per_layer


def total_parameters(cfg: ModelConfig) -> int:
    """Closed form of the model's parameter count (the tests check it against the module)."""
    h, bias = cfg.hidden_size, (1 if cfg.bias else 0)
    layer_norms = 2 * 2 * h
    mlp = cfg.ffn_hidden_size * (h + bias) + h * (cfg.ffn_hidden_size + bias)
    blocks = cfg.num_layers * (layer_norms + mlp) + attention_parameters(cfg)
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings) * h
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * h
    return embeddings + blocks + 2 * h + head


def fuse_groups(tensors: dict[str, torch.Tensor], roles: dict[str, tuple[int, ...]], groups: int,
                head_dim: int) -> torch.Tensor:
    """Per-role tensors (rows = groups × slots × head_dim) -> one tensor with the roles interleaved per group."""
    slots = sum(len(s) for s in roles.values())
    first = next(iter(tensors.values()))
    out = first.new_empty((groups, slots, head_dim) + tuple(first.shape[1:]))
    for role, role_slots in roles.items():
        out[:, list(role_slots)] = tensors[role].reshape((groups, len(role_slots), head_dim) + tuple(first.shape[1:]))
    return out.flatten(0, 2)


def split_groups(fused: torch.Tensor, roles: dict[str, tuple[int, ...]], head_dim: int) -> dict[str, torch.Tensor]:
    """Inverse of fuse_groups."""
    slots = sum(len(s) for s in roles.values())
    blocks = fused.reshape((-1, slots, head_dim) + tuple(fused.shape[1:]))
    return {role: blocks[:, list(s)].flatten(0, 2).clone() for role, s in roles.items()}
