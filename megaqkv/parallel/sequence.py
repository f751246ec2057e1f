"""Sequence parallelism (DeepSpeed-Ulysses): the two all-to-alls around attention, with the bytes they send.

Each SP rank holds a slice of positions of every sample. Before attention, one all-to-all of the projection
output hands every rank all positions of its share of the heads; after it, one all-to-all hands the heads back
for its positions. The exchanges are DeepSpeed's own (`deepspeed.sequence.layer._SeqAllToAll`, the primitive
behind its `DistributedAttention`, differentiable: backward runs the reverse exchange). What megaqkv adds is what
it exchanges: not q, k and v separately but the projection output itself, whose columns hold only what the
variant has (`AttentionLayout.sequence_split`): one all-to-all carries q and the one K=V tensor of Q–K=V, the
one tensor of Q=K=V, the g KV heads of GQA/MQA. DeepSpeed's DistributedAttention exchanges q, k and v apart, so
it would send a K=V tensor twice, and it refuses fewer KV heads than ranks (MQA, Q-MQA): for those each
destination's columns are gathered first (its query heads and a copy of their group's key/value).
"""
from __future__ import annotations

import torch

from ..variants import AttentionLayout
from .grid import SPGroup

# Bytes this process has sent to other SP ranks, by exchange ("projection": before attention, "output": after),
# forward (again in an activation-checkpointing recompute) and backward, since the last reset_sent(): what
# analysis.sequence_exchange computes, counted where it happens (tests/test_parallel.py compares the two).
SENT = {"projection": 0, "output": 0}


def reset_sent() -> None:
    for key in SENT:
        SENT[key] = 0


class _Count(torch.autograd.Function):
    """Identity that records the bytes an exchange of `x` sends, in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str, sp: int):
        ctx.key, ctx.sp = key, sp
        SENT[key] += x.numel() * x.element_size() * (sp - 1) // sp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        SENT[ctx.key] += grad.numel() * grad.element_size() * (ctx.sp - 1) // ctx.sp
        return grad, None, None


def _all_to_all(x: torch.Tensor, sp: SPGroup, scatter: int, gather: int, key: str) -> torch.Tensor:
    from deepspeed.sequence.layer import _SeqAllToAll

    return _SeqAllToAll.apply(sp.group, _Count.apply(x, key, sp.size), scatter, gather, 0)


def heads_for_positions(source: torch.Tensor, dest: AttentionLayout, columns: torch.Tensor | None,
                        sp: SPGroup) -> torch.Tensor:
    """[b, s/sp, cols] projection output of this rank's positions -> [b, s, dest.rows] of all positions for this
    rank's heads, in the fused layout `dest`; (dest, columns) = the TP-local layout's `sequence_split`."""
    b, s = source.shape[:2]
    if columns is not None:
        source = source.index_select(-1, columns)  # backward sums the copies of a shared group's columns
    out = _all_to_all(source.reshape(b, s, sp.size, dest.rows), sp, 2, 1, "projection")
    return out.reshape(b, s * sp.size, dest.rows)


def positions_for_heads(out: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """[b, s, heads/sp, d] attention output of this rank's heads -> [b, s/sp, heads, d] of its positions."""
    return _all_to_all(out, sp, 1, 2, "output")
