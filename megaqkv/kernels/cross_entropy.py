"""LM head + cross-entropy fused over token blocks: no [tokens, vocab] tensor is ever held whole.

The loss is a weighted sum of per-token losses, so its gradient is known during the forward pass up to one
scalar (the upstream gradient). Each block of tokens therefore computes its logits once, turns them in
place into the softmax-minus-target gradient and multiplies it into the hidden and head-weight gradients
before the next block; backward only scales them. That is the three matmuls of an unfused head
(logits, grad of hidden, grad of weight) and one [block, vocab] fp32 buffer instead of four [tokens, vocab]
tensors (bf16 logits, their fp32 copy, shifted logits and exp/softmax).

Tensor parallel: each rank holds a slice of the vocabulary (`VocabParallelEmbedding`); per block two
all-reduces of [block]-sized tensors (the max, then target logit and sum of exponentials) make every
rank's loss the full-vocabulary one, as Megatron's vocab-parallel cross-entropy does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel.grid import TPGroup
from ..parallel.layers import copy_to_tp

# fp32 elements of the per-block logits buffer (256 MiB): blocks of 1,334 tokens at vocab 50,304.
BLOCK_ELEMENTS = 1 << 26


def block_tokens(vocab_rows: int, tokens: int, budget: int = BLOCK_ELEMENTS) -> int:
    return max(1, min(tokens, budget // max(vocab_rows, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, start, valid, tp, block):
        rows = hidden.reshape(-1, hidden.shape[-1])
        labels, token_weights = labels.reshape(-1), token_weights.reshape(-1).float()
        head = weight[:valid]  # padding rows of an even vocabulary split are never scored
        local = labels - start
        inside = (local >= 0) & (local < valid)
        local = local.masked_fill(~inside, 0)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_head = torch.zeros(head.shape, dtype=torch.float32, device=head.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for lo in range(0, rows.shape[0], block):
            h, hi = rows[lo:lo + block], lo + block
            logits = (h @ head.t()).float()
            row_max = logits.max(dim=-1).values if valid else torch.full(h.shape[:1], float("-inf"), device=h.device)
            if tp.size > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp.group)
            logits.sub_(row_max.unsqueeze(-1))
            target = logits.gather(-1, local[lo:hi, None]).squeeze(-1) if valid else torch.zeros_like(row_max)
            target = target.masked_fill(~inside[lo:hi], 0.0)
            sum_exp = logits.exp_().sum(dim=-1)
            if tp.size > 1:
                both = torch.stack([target, sum_exp])
                dist.all_reduce(both, group=tp.group)
                target, sum_exp = both[0], both[1]
            w = token_weights[lo:hi]
            total += (w * (sum_exp.log() - target)).sum()
            if want_grad and valid:
                grad_logits = logits.mul_((w / sum_exp).unsqueeze(-1))  # softmax, weighted
                grad_logits.scatter_add_(-1, local[lo:hi, None], -(w * inside[lo:hi]).unsqueeze(-1))
                grad_logits = grad_logits.to(rows.dtype)
                if grad_rows is not None:
                    torch.mm(grad_logits, head, out=grad_rows[lo:hi])
                if grad_head is not None:  # summed over blocks in fp32, whatever the model's dtype
                    if h.dtype == torch.float32:
                        grad_head.addmm_(grad_logits.t(), h)
                    else:
                        grad_head.add_(grad_logits.t() @ h)
            elif grad_rows is not None:
                grad_rows[lo:hi] = 0
        if grad_head is not None:
            full = torch.zeros_like(weight)
            full[:valid] = grad_head.to(weight.dtype)
            grad_head = full
        ctx.grads = (None if grad_rows is None else grad_rows.view_as(hidden), grad_head)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        scale = lambda g: None if g is None else g.mul_(grad.to(g.dtype))  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         token_weights: torch.Tensor, vocab_start: int, vocab_valid: int, tp: TPGroup,
                         block: int | None = None) -> torch.Tensor:
    """Σ_t token_weights[t] · CE(hidden[t] @ weightᵀ, labels[t]), fp32, over the whole (TP-split) vocabulary.

    `weight` is this rank's head slice, rows [vocab_start, vocab_start + vocab_valid) real (the rest is
    padding); `hidden` is replicated over TP. Mean loss: token_weights = mask / mask.sum()."""
    block = block or block_tokens(vocab_valid, labels.numel())
    return _LinearCrossEntropy.apply(copy_to_tp(hidden, tp), weight, labels, token_weights, vocab_start,
                                     vocab_valid, tp, block)
