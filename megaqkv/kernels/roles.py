"""q, k, v as views of the projection output, with a backward that writes the projection's gradient once.

Autograd's own backward of slicing allocates a zero-filled gradient of the whole fused projection per
role and sums them (`select_backward` / `slice_backward` in a profile); here each role's gradient is
written into its columns of one uninitialised tensor, and a shared role (K=V, Q=K) arrives already summed
because it is one view. The Triton backend does not need this: its backward writes that layout itself.
"""
from __future__ import annotations

import torch

from .columns import Columns


def _spans(cols: Columns, width: int) -> tuple[tuple[int, int], ...]:
    """Distinct (first slot, slot count) per role inside one group block of `width` slots: q, k[, v]."""
    d = cols.head_dim
    spans = [] if cols.q_is_k or not cols.one_source else [(cols.q_base // d, cols.q_per_group)]
    spans.append((cols.k_base // d, 1))
    if not cols.kv_shared:
        spans.append((cols.v_base // d, 1))
    assert sum(n for _, n in spans) == width, "the roles must cover every column of the projection"
    return tuple(spans)


class _Views(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, spans, head_dim):
        ctx.spans, ctx.head_dim = spans, head_dim
        blocks = src.view(*src.shape[:2], -1, sum(n for _, n in spans), head_dim)
        ctx.groups = blocks.shape[2]
        return tuple(blocks[:, :, :, a:a + n].flatten(2, 3) for a, n in spans)

    @staticmethod
    def backward(ctx, *grads):
        b, s = next(g for g in grads if g is not None).shape[:2]
        like = next(g for g in grads if g is not None)
        out = like.new_empty(b, s, ctx.groups, sum(n for _, n in ctx.spans), ctx.head_dim)
        for g, (a, n) in zip(grads, ctx.spans):
            out[:, :, :, a:a + n] = 0 if g is None else g.view(b, s, ctx.groups, n, ctx.head_dim)
        return out.flatten(2), None, None


def _views(src: torch.Tensor, spans, head_dim: int) -> tuple[torch.Tensor, ...]:
    if torch.is_grad_enabled() and src.requires_grad:
        return _Views.apply(src.contiguous(), spans, head_dim)
    blocks = src.reshape(*src.shape[:2], -1, sum(n for _, n in spans), head_dim)
    return tuple(blocks[:, :, :, a:a + n].flatten(2, 3) for a, n in spans)


def split_roles(q_src: torch.Tensor, kv_src: torch.Tensor | None, cols: Columns):
    """q [b, s, heads, d], k and v [b, s, groups, d]; a shared role is the same tensor object."""
    d = cols.head_dim
    if cols.one_source:
        parts = list(_views(q_src, _spans(cols, cols.q_group_stride // d), d))
        q = None if cols.q_is_k else parts.pop(0)
    else:
        q = q_src.view(*q_src.shape[:2], cols.heads, d)
        parts = list(_views(kv_src, _spans(cols, kv_src.shape[-1] // d), d))
    k = parts[0]
    v = k if cols.kv_shared else parts[1]
    return (k if q is None else q), k, v
