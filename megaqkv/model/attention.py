"""Causal self-attention for every variant: one class, parameterised by (sharing, num_kv_heads)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import ModelConfig
from ..kernels.attention import causal_attention
from ..kernels.columns import Columns
from ..kernels.decode import cached_attention
from ..kernels.roles import split_roles
from ..parallel.grid import NO_SP, SINGLE, SPGroup, TPGroup
from ..parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, copy_to_tp
from ..parallel.sequence import heads_for_positions, positions_for_heads
from ..variants import AttentionLayout


class Attention(nn.Module):
    """Input projection holding only the rows the variant needs, attention, then the output projection.

    Roles that share a projection are the *same tensor* downstream: with K=V the key is passed as
    the value, with Q=K the query is the key. Under tensor parallelism each rank owns whole KV
    groups of the fused `in_proj` (column split); with fewer KV heads than TP ranks the query rows
    are split (`q_proj`) and the small K/V rows are replicated (`kv_proj`), each rank reading the
    group its query heads belong to. Under sequence parallelism (`sp`) the projection output of this rank's
    positions is exchanged for all positions of a share of its heads (`parallel.sequence`) around the kernel.
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE, sp: SPGroup = NO_SP):
        super().__init__()
        layout = AttentionLayout.of(cfg)
        self.tp, self.sp = tp, sp
        self.backend = cfg.attention_backend
        self.dropout_p = cfg.attention_dropout
        self.head_dim = layout.head_dim
        h = cfg.hidden_size
        self.local = layout.tensor_split(tp.size)
        if layout.num_kv_heads % tp.size == 0:
            self.in_proj = ColumnParallelLinear(h, layout.rows, tp, bias=cfg.bias)
        else:
            self.q_proj = ColumnParallelLinear(h, layout.num_heads * layout.head_dim, tp, bias=cfg.bias,
                                               copy_input=False)
            kv_rows = layout.kv_head_tensors() * layout.head_dim
            self.kv_proj = ReplicatedLinear(h, layout.num_kv_heads * kv_rows, tp, bias=cfg.bias)
            group = tp.rank // (tp.size // layout.num_kv_heads)
            self.kv_rows = (group * kv_rows, (group + 1) * kv_rows)
        self.out_proj = RowParallelLinear(h, h, tp, bias=cfg.bias)
        self.cols = (Columns.fused(self.local) if hasattr(self, "in_proj")
                     else Columns.split(self.local.num_heads, self.head_dim, layout.kv_shared))
        if sp.size > 1:  # the q_proj/kv_proj pair side by side is the fused layout of one group
            self.sp_layout, columns = self.local.sequence_split(sp.size)
            self.sp_cols = Columns.fused(self.sp_layout)
            self.register_buffer("sp_columns", None if columns is None else torch.tensor(columns), persistent=False)

    @property
    def kernel_cols(self) -> Columns:
        """The layout the attention kernel reads here (under SP: the exchanged one), which a run warms up and names
        before training: a kernel's self-test must not first run inside a checkpointed or no-grad forward."""
        return self.sp_cols if self.sp.size > 1 else self.cols

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The projection output(s) the kernels read: the fused rows, or the query rows and this rank's K/V rows."""
        if hasattr(self, "in_proj"):
            return self.in_proj(x), None
        x = copy_to_tp(x, self.tp)  # one all-reduce of dx covers both the query and the K/V path
        return self.q_proj(x), self.kv_proj.rows(x, *self.kv_rows)

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        sources = self.project(x)
        if cache is not None:
            return self.out_proj(self.attend_cached(sources, cache, layer).flatten(2))
        return self.out_proj(self.attend(sources, self.dropout_p if self.training else 0.0).flatten(2))

    @torch.compiler.disable
    def attend(self, sources, dropout: float) -> torch.Tensor:
        """The attention kernel, eager under torch.compile (a graph break of its own): Triton, flash-attn and
        SDPA are fused kernels already, and the per-rank RNG stream swaps generator states, which a graph
        cannot. Dropout on this rank's own heads draws from that stream."""
        stream = self.tp.rng.fork() if dropout > 0 and self.tp.size > 1 else contextlib.nullcontext()
        if self.sp.size == 1:
            with stream:
                return causal_attention(*sources, self.cols, dropout_p=dropout, backend=self.backend)
        mine = sources[0] if sources[1] is None else torch.cat(sources, dim=-1)
        gathered = heads_for_positions(mine, self.sp_layout, self.sp_columns, self.sp)
        with stream:
            out = causal_attention(gathered, None, self.sp_cols, dropout_p=dropout, backend=self.backend)
        return positions_for_heads(out, self.sp)

    def attend_cached(self, sources, cache, layer: int) -> torch.Tensor:
        """Attention of the new tokens over everything cached. A prefill (empty cache) runs the training
        kernel over the prompt; later tokens read the cache once (`kernels.decode`)."""
        q, k, v = split_roles(*sources, self.cols)
        keys, values = cache.write(layer, k, v)
        if cache.length == 0:
            return causal_attention(*sources, self.cols, backend=self.backend, padding=cache.padding)
        return cached_attention(q, keys, values, cache.valid, cache.length)
