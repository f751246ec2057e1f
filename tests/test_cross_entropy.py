"""The fused, blocked LM head + cross-entropy (megaqkv.kernels.cross_entropy) against torch's own loss on
explicit logits: loss, the hidden and head-weight gradients, any block size, vocabulary padding rows.
Its TP=2 form is checked against TP=1 in tests/test_parallel.py (scenario "fused loss tp2 ...")."""
import pytest
import torch
import torch.nn.functional as F

from megaqkv.kernels.cross_entropy import block_tokens, linear_cross_entropy
from megaqkv.parallel.grid import SINGLE

T, H, V, ROWS = 37, 16, 50, 64  # 14 padding rows, as an even TP split of the vocabulary leaves


def case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(ROWS, H, generator=g).to(dtype).requires_grad_()
    return hidden, weight, torch.randint(0, V, (T,), generator=g), torch.rand(T, generator=g)


def reference(hidden, weight, labels, weights):
    """torch's cross-entropy over the real rows' fp32 logits."""
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = (F.cross_entropy(h @ w[:V].t(), labels, reduction="none") * weights).sum()
    (3 * loss).backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("block", [1, 5, T, None])
def test_equals_torch_cross_entropy_for_any_block(block):
    hidden, weight, labels, weights = case()
    loss = linear_cross_entropy(hidden, weight, labels, weights, 0, V, SINGLE, block)
    (3 * loss).backward()  # the upstream gradient scales what the forward pass computed
    ref_loss, ref_h, ref_w = reference(hidden, weight, labels, weights)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert (hidden.grad - ref_h).abs().max() <= 1e-5 and (weight.grad - ref_w).abs().max() <= 1e-5
    assert ref_w.abs().max() > 0.1 and torch.all(weight.grad[V:] == 0)  # padding rows are never scored


def test_bf16_within_bf16_rounding_of_the_fp32_loss():
    hidden, weight, labels, weights = case(torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, labels, weights, 0, V, SINGLE, 8)
    (3 * loss).backward()
    ref_loss, ref_h, ref_w = reference(hidden, weight, labels, weights)
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref_loss.item()) <= 1e-2 * ref_loss.item()
    for got, want in ((hidden.grad, ref_h), (weight.grad, ref_w)):
        assert (got.float() - want).abs().max() <= 2e-2 * want.abs().max()


def test_no_gradient_mode_computes_the_same_loss_only():
    hidden, weight, labels, weights = case()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, weights, 0, V, SINGLE, 5)
    assert not loss.requires_grad and abs(loss.item() - reference(hidden, weight, labels, weights)[0].item()) <= 1e-4


def test_block_size_keeps_one_logits_block_at_256_mib():
    assert block_tokens(50304, 8192) == 1334 and block_tokens(50304 // 8, 8192) == 8192
    assert block_tokens(10 ** 9, 8192) == 1
