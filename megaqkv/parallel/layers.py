"""Tensor-parallel building blocks (Megatron layouts) that degrade to plain modules at TP=1.

Sharded parameters carry `tensor_model_parallel = True` (DeepSpeed then counts them on every
TP rank in the gradient norm) and `partition_dim`; replicated ones carry neither and are
counted once, on TP rank 0.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .grid import SINGLE, TPGroup


def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=tp.group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the TP group (the input fed every rank's shard)."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    """Sum of the ranks' partial results forward; identity backward."""

    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x.clone(), tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# Collectives run eagerly under torch.compile: a compiled block breaks its graph around them (TP > 1 only).
_copy_eager = torch.compiler.disable(_CopyToTP.apply)
_reduce_eager = torch.compiler.disable(_ReduceFromTP.apply)


def copy_to_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _copy_eager(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _reduce_eager(x, tp)


def mark_sharded(param: nn.Parameter, dim: int) -> nn.Parameter:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    return param


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by the tensor parallel size {parts}")
    return total // parts


class ColumnParallelLinear(nn.Module):
    """y = x Aᵀ + b with A's rows (output features) split across TP ranks; output stays sharded.

    `copy_input=False` when the caller already routed x through `copy_to_tp` for several consumers.
    """

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = SINGLE, bias: bool = True,
                 copy_input: bool = True):
        super().__init__()
        self.tp = tp
        self.copy_input = copy_input
        local = divide(out_features, tp.size, "output features")
        self.weight = mark_sharded(nn.Parameter(torch.empty(local, in_features)), 0)
        self.bias = mark_sharded(nn.Parameter(torch.empty(local)), 0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.tp) if self.copy_input else x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x Aᵀ + b with A's columns (input features) split; partial products are summed over TP."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = SINGLE, bias: bool = True):
        super().__init__()
        self.tp = tp
        local = divide(in_features, tp.size, "input features")
        self.weight = mark_sharded(nn.Parameter(torch.empty(out_features, local)), 1)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias


class ReplicatedLinear(nn.Module):
    """A small projection every TP rank holds whole but uses only partly (K/V heads when fewer than TP).

    Its gradient is summed over the TP group inside backward, so every rank sees the full gradient
    (ranks that did not use a row contribute zero) and the replicas stay identical.
    """

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = SINGLE, bias: bool = True):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """x times rows [start, stop) of the weight only."""
        weight = copy_to_tp(self.weight, self.tp)[start:stop]
        bias = None if self.bias is None else copy_to_tp(self.bias, self.tp)[start:stop]
        return F.linear(x, weight, bias)


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Rows of the (vocab-parallel) embedding: vocab rounded up to a multiple of 128·TP."""
    step = multiple * tp_size
    return math.ceil(vocab_size / step) * step


def vocab_partition(vocab_size: int, tp: TPGroup) -> tuple[int, int, int]:
    """(first row, rows, real rows) of this rank's slice of the (padded) vocabulary."""
    padded = padded_vocab_size(vocab_size, tp.size) if tp.size > 1 else vocab_size
    part = padded // tp.size
    start = tp.rank * part
    return start, part, max(0, min(part, vocab_size - start))


class VocabParallelEmbedding(nn.Module):
    """Token embedding split by vocabulary rows; also the tied output head.

    Rows past `vocab_size` are padding for an even split: they are never looked up and are
    masked out of the softmax, so the model's numbers do not depend on TP.
    """

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.start, self.part, self.valid = vocab_partition(vocab_size, tp)
        self.weight = mark_sharded(nn.Parameter(torch.empty(self.part, hidden)), 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.start
        outside = (local < 0) | (local >= self.part)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside[..., None], 0.0), self.tp)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the output logits, [..., part]; padded columns are -inf."""
        out = F.linear(copy_to_tp(hidden, self.tp), self.weight)
        if self.valid < self.part:
            out = out.masked_fill(torch.arange(self.part, device=out.device) >= self.valid, float("-inf"))
        return out


def gather_vocab(logits: torch.Tensor, embedding: VocabParallelEmbedding) -> torch.Tensor:
    """This rank's logit slice -> the full [..., vocab_size] logits on every rank (for sampling)."""
    tp = embedding.tp
    if tp.size == 1:
        return logits[..., :embedding.vocab_size]
    parts = [torch.empty_like(logits) for _ in range(tp.size)]
    dist.all_gather(parts, logits.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)[..., :embedding.vocab_size]
