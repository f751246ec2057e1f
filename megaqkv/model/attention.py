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

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        q, k, v = self.project(x)
        if cache is not None:
            return self.out_proj(self.attend_cached(q, k, v, cache, layer).flatten(2))
        dropout = self.dropout_p if self.training else 0.0
        # Dropout on this rank's own heads draws from the per-rank stream.
        stream = self.tp.rng.fork() if dropout > 0 and self.tp.size > 1 else contextlib.nullcontext()
        with stream:
            out = causal_attention(q, k, v, dropout_p=dropout, backend=self.backend)
        return self.out_proj(out.flatten(2))

    @staticmethod
    def attend_cached(q, k, v, cache, layer: int) -> torch.Tensor:
        """Attention of the new tokens over everything cached (prefill and decode).

        The query heads of a KV group are stacked against that group's keys, so a grouped or multi-query
        cache is read once per group, never repeated per query head (PyTorch's CPU SDPA kernel spends
        milliseconds per layer on a one-token query at long contexts; two matmuls take microseconds).
        K=V passes one cached tensor as both.
        """
        keys, values = cache.update(layer, k, v)  # [b, g, length, d]
        b, n, heads, d = q.shape
        groups = keys.shape[1]
        grouped = q.reshape(b, n, groups, heads // groups, d).permute(0, 2, 3, 1, 4).reshape(b, groups, -1, d)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * d ** -0.5  # [b, g, r*n, length]
        scores = scores.view(b, groups, heads // groups, n, -1).masked_fill(~cache.attention_mask(n)[:, None],
                                                                            float("-inf"))
        probs = scores.softmax(-1).to(values.dtype).view(b, groups, -1, scores.shape[-1])
        out = torch.matmul(probs, values)  # [b, g, r*n, d]
        return out.view(b, groups, heads // groups, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, heads, d)
