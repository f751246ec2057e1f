"""Attention of new tokens over a KV cache, reading every cached byte once.

Two products per cache tile (q·kᵀ, then p·v) with an online softmax in between, so a K=V tile serves both
while it is still in fast memory, and the r query heads of a KV group are stacked against their group's
tile (one read per group, never per query head). On CUDA one new token per sequence runs the Triton
flash-decoding kernel; everywhere else the same algorithm runs blockwise in PyTorch: each block of the cache is
copied once into a small contiguous tile (the CPU's matmuls run 2-4x slower on a strided slice), which
stays in the CPU's caches for both products.
"""
from __future__ import annotations

import torch

from .detect import passes_self_test, triton_runs_on

# Cache bytes staged per block of the PyTorch path (keys and values of all sequences and KV heads): small
# enough to stay in the CPU's caches between the two products, large enough that the per-block Python work
# is noise. 8 MiB measured best on a 2-core Xeon (bench/attention.py, docs/kernels.md).
BLOCK_BYTES = 8 << 20


def decode_backend(t: torch.Tensor, new_tokens: int) -> str:
    """'triton' (CUDA, one new token per sequence) or 'torch' (blocked PyTorch)."""
    return "triton" if new_tokens == 1 and t.is_cuda and triton_runs_on(t) else "torch"


def triton_decode_self_test(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """The Triton decode kernel on a small cache of this shape equals the PyTorch path."""
    heads, groups, d = q.shape[2], keys.shape[1], q.shape[-1]

    def run() -> float:
        from .triton_decode import triton_decode

        g = torch.Generator(q.device).manual_seed(0)
        k = torch.randn(2, groups, 300, d, generator=g, device=q.device, dtype=q.dtype)
        v = k if values is keys else torch.randn(k.shape, generator=g, device=q.device, dtype=q.dtype)
        valid = torch.ones(2, 300, dtype=torch.bool, device=q.device)
        valid[1, :50] = False
        x = torch.randn(2, 1, heads, d, generator=g, device=q.device, dtype=q.dtype)
        want = blocked_attention(x, k, v, valid, 299).float()
        got = triton_decode(x[:, 0], k, v, valid, 300)[:, None].float()
        return ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()

    return passes_self_test(("Triton decode", q.device.type, q.dtype, heads, groups, d, values is keys), run, 2e-2)


def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                     start: int) -> torch.Tensor:
    """q [b, n, heads, d]: the tokens at slots start..start+n-1, already written to the cache buffers
    keys/values [b, groups, max_len, d] (`values is keys` for K=V). Query i sees slot s <= start+i that is
    `valid` or is itself. Returns [b, n, heads, d]."""
    if decode_backend(q, q.shape[1]) == "triton" and triton_decode_self_test(q, keys, values):
        from .triton_decode import triton_decode  # imported on first use: TRITON_INTERPRET is read then
        return triton_decode(q[:, 0], keys, values, valid, start + 1)[:, None]
    return blocked_attention(q, keys, values, valid, start)


def blocked_attention(q, keys, values, valid, start, block: int | None = None) -> torch.Tensor:
    """The PyTorch path of `cached_attention`: online softmax over blocks of `block` cache slots."""
    b, n, heads, d = q.shape
    groups, length = keys.shape[1], start + n
    r = heads // groups
    tensors = 1 if values is keys else 2
    if block is None:
        block = max(64, BLOCK_BYTES // (b * groups * d * keys.element_size() * tensors))
    block = min(block, length)
    stacked = q.reshape(b, n, groups, r, d).permute(0, 2, 3, 1, 4).reshape(b, groups, r * n, d)
    query_slot = torch.arange(start, length, device=q.device)[:, None]
    staging = None if b * groups == 1 else keys.new_empty(tensors, b * groups * block * d)

    def stage(buffer: int, src: torch.Tensor) -> torch.Tensor:
        """One contiguous copy of a strided cache slice, in a buffer every block reuses (one sequence's
        single KV head is contiguous already)."""
        return src if staging is None else staging[buffer, :src.numel()].view(src.shape).copy_(src)

    def scores_of(tile: torch.Tensor, a: int) -> torch.Tensor:
        """[b, g, r, n, t] scaled scores of the tile at slot a, -inf where a query may not look."""
        scores = torch.matmul(stacked, tile.transpose(-1, -2)).float().mul_(d ** -0.5)
        slot = torch.arange(a, a + tile.shape[2], device=q.device)
        seen = (slot <= query_slot) & (valid[:, None, a:a + tile.shape[2]] | (slot == query_slot))  # [b, n, t]
        return scores.view(b, groups, r, n, -1).masked_fill_(~seen[:, None, None], float("-inf"))

    if block == length:  # one block: a plain softmax, no running statistics
        tile = stage(0, keys[:, :, :length])
        probs = scores_of(tile, 0).softmax(-1).to(tile.dtype).view(b, groups, r * n, length)
        out = torch.matmul(probs, tile if values is keys else stage(1, values[:, :, :length]))
    else:
        best = torch.full((b, groups, r, n, 1), float("-inf"), device=q.device)
        total = torch.zeros_like(best)
        acc = torch.zeros(b, groups, r * n, d, device=q.device)
        for a in range(0, length, block):
            e = min(a + block, length)
            tile = stage(0, keys[:, :, a:e])  # read from the cache once; with K=V it serves both products
            scores = scores_of(tile, a)
            new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
            shift = new_best.masked_fill(new_best == float("-inf"), 0.0)  # a block nothing sees yet adds nothing
            probs = torch.exp(scores - shift)
            rescale = torch.exp(best - shift)
            total = total * rescale + probs.sum(-1, keepdim=True)
            value_tile = tile if values is keys else stage(1, values[:, :, a:e])
            pv = torch.matmul(probs.to(tile.dtype).view(b, groups, r * n, e - a), value_tile)
            acc = acc * rescale.view(b, groups, r * n, 1) + pv.float()
            best = new_best
        out = acc / total.view(b, groups, r * n, 1)
    return out.to(q.dtype).view(b, groups, r, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, heads, d)
