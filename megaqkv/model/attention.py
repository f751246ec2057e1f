"""Causal self-attention for every variant: one class, parameterised by (sharing, num_kv_heads)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import ModelConfig
from ..parallel.grid import SINGLE, TPGroup
from ..parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, copy_to_tp
from ..variants import AttentionLayout
from .kernels import causal_attention


class Attention(nn.Module):
    """Input projection holding only the rows the variant needs, attention, then the output projection.

    Roles that share a projection are the *same tensor* downstream: with K=V the key is passed as
    the value, with Q=K the query is the key. Under tensor parallelism each rank owns whole KV
    groups of the fused `in_proj` (column split); with fewer KV heads than TP ranks the query rows
    are split (`q_proj`) and the small K/V rows are replicated (`kv_proj`), each rank reading the
    group its query heads belong to.
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        layout = AttentionLayout.of(cfg)
        self.tp = tp
        self.backend = cfg.attention_backend
        self.dropout_p = cfg.attention_dropout
        self.head_dim = layout.head_dim
        h = cfg.hidden_size
        if layout.num_kv_heads % tp.size == 0:
            self.local = AttentionLayout(layout.sharing, layout.num_heads // tp.size,
                                         layout.num_kv_heads // tp.size, layout.head_dim)
            self.in_proj = ColumnParallelLinear(h, layout.rows, tp, bias=cfg.bias)
        else:
            self.local = AttentionLayout(layout.sharing, layout.num_heads // tp.size, 1, layout.head_dim)
            self.q_proj = ColumnParallelLinear(h, layout.num_heads * layout.head_dim, tp, bias=cfg.bias,
                                               copy_input=False)
            kv_rows = layout.kv_head_tensors() * layout.head_dim
            self.kv_proj = ReplicatedLinear(h, layout.num_kv_heads * kv_rows, tp, bias=cfg.bias)
            group = tp.rank // (tp.size // layout.num_kv_heads)
            self.kv_rows = (group * kv_rows, (group + 1) * kv_rows)
        self.out_proj = RowParallelLinear(h, h, tp, bias=cfg.bias)

    def split_heads(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[b, s, rows] -> q [b, s, heads, d], k and v [b, s, kv_heads, d]; shared roles stay one tensor."""
        lay = self.local
        b, s, _ = fused.shape
        blocks = fused.view(b, s, -1, lay.slots_per_group, lay.head_dim)
        k = blocks[:, :, :, lay.k_slot]
        v = k if lay.v_slot == lay.k_slot else blocks[:, :, :, lay.v_slot]
        q = k if lay.sharing in ("qk", "qkv") else blocks[:, :, :, :lay.q_per_group].flatten(2, 3)
        return q, k, v

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hasattr(self, "in_proj"):
            return self.split_heads(self.in_proj(x))
        x = copy_to_tp(x, self.tp)  # one all-reduce of dx covers both the query and the K/V path
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        kv = self.kv_proj.rows(x, *self.kv_rows).view(b, s, 1, -1, self.head_dim)
        k = kv[:, :, :, 0]
        return q, k, (k if kv.shape[3] == 1 else kv[:, :, :, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        dropout = self.dropout_p if self.training else 0.0
        # Dropout on this rank's own heads draws from the per-rank stream.
        stream = self.tp.rng.fork() if dropout > 0 and self.tp.size > 1 else contextlib.nullcontext()
        with stream:
            out = causal_attention(q, k, v, dropout_p=dropout, backend=self.backend)
        return self.out_proj(out.flatten(2))
