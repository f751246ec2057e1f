"""GPT-2 architecture (DESIGN §1) from layers that a pipeline can also stack one by one.

The same layer classes build the plain model (`GPT`, for evaluation, generation and as the
TP=1 reference) and the pipeline stages (`megaqkv.model.pipeline`), so parameters are the
same objects with the same local names. Tensor parallelism enters only through the layer
types and the `TPGroup` they are given.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel.grid import NO_SP, SINGLE, SPGroup, TPGroup
from ..kernels.cross_entropy import linear_cross_entropy
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from ..parallel.random import checkpoint
from ..parallel.sharding import init_parameters
from .attention import Attention
from ..kernels.norm import LayerNorm


class PositionEmbedding(nn.Module):
    """Adds learned absolute position embeddings to the token embeddings, then embedding dropout. Under sequence
    parallelism `x` holds the rank's slice of positions: slice `sp.rank` of `sp.size` equal ones."""

    def __init__(self, cfg: ModelConfig, sp: SPGroup = NO_SP):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.hidden_size))
        self.dropout = nn.Dropout(cfg.embedding_dropout)
        self.sp = sp

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None:
            return self.dropout(x + self.weight[positions])
        start, stop = self.sp.rank * x.shape[1], (self.sp.rank + 1) * x.shape[1]
        if stop > self.weight.shape[0]:
            raise ValueError(f"sequence length {x.shape[1] * self.sp.size} exceeds max_position_embeddings="
                             f"{self.weight.shape[0]}")
        return self.dropout(x + self.weight[start:stop])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.fc_in = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, tp, bias=cfg.bias)
        self.fc_out = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, tp, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))  # exact (erf) GELU, as GPT-2 trained with


class Block(nn.Module):
    """Pre-LayerNorm transformer block; residual dropout after attention and after the MLP."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE, checkpointed: bool = False, compiled: bool = False,
                 sp: SPGroup = NO_SP):
        super().__init__()
        self.tp = tp
        self.checkpointed = checkpointed
        self.compiled = compiled
        self.ln_1 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg, tp, sp)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg, tp)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def _forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x), cache, layer))
        return x + self.dropout(self.mlp(self.ln_2(x)))

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        if cache is not None:  # cached generation stays eager: its shapes change every step
            return self._forward(x, cache, layer)
        run = functools.partial(compiled_block, self) if self.compiled else self._forward
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(run, x, self.tp.rng)
        return run(x)


@torch.compile
def compiled_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """A block under torch.compile (`model.compile`): LayerNorm, bias + GELU and bias + dropout + residual add
    become fused kernels; the attention kernel and TP collectives are graph breaks (eager). One compiled
    graph serves every block of the model: its parameters are graph inputs, not constants."""
    return block._forward(x)


def token_weights(labels: torch.Tensor, loss_mask: torch.Tensor | None, mean: bool = True,
                  sp: SPGroup = NO_SP) -> torch.Tensor:
    """Each token's share of the loss: 1/count for a token-weighted mean (masked positions, padding, count
    neither in the sum nor the count), or the mask itself for a sum.

    Under sequence parallelism `labels` is this rank's slice: the count is the whole micro-batch's (summed over
    the SP ranks), and the mean is scaled by SP, because DeepSpeed averages gradients over its data axis, which
    holds the SP ranks: the average of SP · (slice sum / count) over them is the micro-batch's mean."""
    mask = torch.ones(labels.shape, device=labels.device) if loss_mask is None else loss_mask.float()
    if not mean:
        return mask
    count = mask.sum()
    if sp.size > 1:
        dist.all_reduce(count, group=sp.group)
    return mask * (sp.size / count.clamp(min=1.0))


def head_loss(head: VocabParallelEmbedding, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ weights · cross-entropy of the (tied or untied, vocab-parallel) head, fused: no [tokens, vocab] tensor.
    `weight`: the head's weight as the pipeline's last layer hands it on (default: head.weight)."""
    return linear_cross_entropy(hidden, head.weight if weight is None else weight, labels, weights, head.start,
                                head.valid, head.tp)


class GPTOutput(NamedTuple):
    logits: torch.Tensor | None  # this TP rank's vocabulary slice ([..., vocab] at TP=1)
    loss: torch.Tensor | None


class GPT(nn.Module):
    """The plain (single-stage) model; at TP>1 each rank holds its shards and returns its logit slice."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE, seed: int = 1234, checkpointed: bool = False,
                 compiled: bool = False):
        super().__init__()
        self.cfg = cfg
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.wpe = PositionEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg, tp, checkpointed, compiled) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.lm_head = None if cfg.tie_embeddings else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        init_parameters(self.named_parameters(), cfg, tp, seed)

    @property
    def head(self) -> VocabParallelEmbedding:
        return self.wte if self.lm_head is None else self.lm_head

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, cache=None, valid: torch.Tensor | None = None,
                last_only: bool = False, logits: bool | None = None) -> GPTOutput:
        """With a `KVCache`, `tokens` continue what the cache holds (a left-padded prompt whose real tokens
        `valid` marks, or one new token per sequence) and the cache advances past them. `last_only`: logits
        of the last position only (what generation samples from), not a [tokens, vocab] tensor. With `labels` the
        loss is fused (no logits tensor) and logits are returned only when `logits=True`."""
        positions = None
        if cache is not None:
            positions = cache.begin(torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid)
        x = self.wpe(self.wte(tokens), positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
        if cache is not None:
            cache.advance(tokens.shape[1])
        if last_only:
            x = x[:, -1:]
        hidden = self.ln_f(x)
        loss = None if labels is None else head_loss(self.head, hidden, labels, token_weights(labels, loss_mask))
        want = labels is None if logits is None else logits
        return GPTOutput(self.head.logits(hidden) if want else None, loss)
