"""Causal self-attention for every variant: one class, parameterised by (sharing, num_kv_heads)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..variants import AttentionLayout
from .kernels import causal_attention


class Attention(nn.Module):
    """Fused input projection holding only the rows the variant needs, then attention, then out_proj.

    Roles that share a projection are the *same tensor* downstream: with K=V the
    key is passed as the value, with Q=K the query is the key.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layout = AttentionLayout.of(cfg)
        self.backend = cfg.attention_backend
        self.dropout_p = cfg.attention_dropout
        self.in_proj = nn.Linear(cfg.hidden_size, self.layout.rows, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)

    def split_heads(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[b, s, rows] -> q [b, s, heads, d], k and v [b, s, kv_heads, d]; shared roles stay one tensor."""
        lay = self.layout
        b, s, _ = fused.shape
        blocks = fused.view(b, s, -1, lay.slots_per_group, lay.head_dim)
        groups = blocks.shape[2]
        k = blocks[:, :, :, lay.k_slot]
        v = k if lay.v_slot == lay.k_slot else blocks[:, :, :, lay.v_slot]
        q = k if lay.sharing in ("qk", "qkv") else blocks[:, :, :, :lay.q_per_group].reshape(
            b, s, groups * lay.q_per_group, lay.head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.in_proj(x))
        out = causal_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0,
                               backend=self.backend)
        return self.out_proj(out.flatten(2))
