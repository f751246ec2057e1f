"""Flash-decoding: attention of one new token per sequence over the KV cache, in Triton.

Decoding is bound by reading the cache, so the kernel reads each cached byte once. A program owns one
(sequence, KV group, context split): the r query heads of the group are stacked as the rows of one tile
against the group's cache tile, so GQA/MQA read a tile once per group, not once per query head; with K=V
the one loaded tile serves both q·kᵀ and p·v. At small batch a sequence × group grid cannot fill the GPU,
so the context is split (split-K): each split keeps an online softmax over its slots and writes an
unnormalised fp32 partial with its running max and sum, and a second small kernel merges the splits.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_ROWS = 16  # tl.dot needs at least 16 rows: the stacked query heads are padded up to this
MIN_TILES_PER_SPLIT = 4  # a split shorter than this spends more on its partial than it saves
PROGRAMS_PER_SM = 2


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, max_ptr, sum_ptr,
                  length, split_len, qk_scale,
                  s_qb, s_qh, s_kb, s_kg, s_kn, s_vb, s_vg, s_vn, s_fb, s_fn,
                  s_ob, s_oh, s_os, s_xb, s_xh, s_xs,
                  GROUPS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  D: tl.constexpr, KV_SHARED: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                  PRECISION: tl.constexpr):
    split = tl.program_id(0)
    b = tl.program_id(1) // GROUPS
    g = tl.program_id(1) % GROUPS
    rows = tl.arange(0, BLOCK_M)
    heads = g * R + rows
    dims = tl.arange(0, D)
    row_ok = rows < R
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + b * s_kb + g * s_kg
    v_base = v_ptr + b * s_vb + g * s_vg

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    for start in range(lo, hi, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        in_range = slots < length  # only the last tile of the context is ragged; its tail is never loaded
        k = tl.load(k_base + slots[:, None] * s_kn + dims[None, :], mask=in_range[:, None], other=0.0)
        seen = tl.load(valid_ptr + b * s_fb + slots * s_fn, mask=in_range, other=0) != 0
        seen = in_range & (seen | (slots == length - 1))
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
        scores = tl.where(seen[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # nothing seen yet: every term is 0
        probs = tl.exp2(scores - shift[:, None])
        rescale = tl.exp2(best - shift)
        total = total * rescale + tl.sum(probs, 1)
        if KV_SHARED:
            v = k
        else:
            v = tl.load(v_base + slots[:, None] * s_vn + dims[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        best = new_best

    out = o_ptr + b * s_ob + heads[:, None] * s_oh + split * s_os + dims[None, :]
    if SINGLE_SPLIT:  # the new token is always seen, so total > 0 for every row
        tl.store(out, (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(out, acc, mask=row_ok[:, None])
        stats = b * s_xb + heads * s_xh + split * s_xs
        tl.store(max_ptr + stats, best, mask=row_ok)
        tl.store(sum_ptr + stats, total, mask=row_ok)


@triton.jit
def _combine_kernel(part_ptr, max_ptr, sum_ptr, o_ptr, splits,
                    s_pb, s_ph, s_ps, s_mb, s_mh, s_ms, s_ob, s_oh,
                    HEADS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0) // HEADS
    h = tl.program_id(0) % HEADS
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, D)
    ok = s < splits
    best = tl.load(max_ptr + b * s_mb + h * s_mh + s * s_ms, mask=ok, other=float("-inf"))
    total = tl.load(sum_ptr + b * s_mb + h * s_mh + s * s_ms, mask=ok, other=0.0)
    part = tl.load(part_ptr + b * s_pb + h * s_ph + s[:, None] * s_ps + dims[None, :], mask=ok[:, None], other=0.0)
    # the split holding the new token has a finite max, so a fully masked split (max -inf) weighs exp2(-inf) = 0
    weight = tl.exp2(best - tl.max(best, 0))
    out = tl.sum(part * weight[:, None], 0) / tl.sum(total * weight, 0)
    tl.store(o_ptr + b * s_ob + h * s_oh + dims, out.to(o_ptr.dtype.element_ty))


def plan(batch: int, groups: int, length: int, head_dim: int, device: torch.device,
         block_n: int | None = None) -> tuple[int, int]:
    """(BLOCK_N, slots per split): enough programs for PROGRAMS_PER_SM on every SM, each split at least
    MIN_TILES_PER_SPLIT tiles. The interpreter (CPU tensors) gets 16-slot tiles and aims at 2 programs, so
    the tests stay fast."""
    if device.type == "cuda":
        block_n = block_n or (64 if head_dim <= 128 else 32)
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        block_n, target = block_n or 16, 2
    tiles = triton.cdiv(length, block_n)
    splits = max(1, min(triton.cdiv(target, batch * groups), tiles // MIN_TILES_PER_SPLIT))
    return block_n, triton.cdiv(tiles, splits) * block_n


def triton_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                  length: int, *, block_n: int | None = None, split_len: int | None = None) -> torch.Tensor:
    """q [batch, heads, d] (the new token's queries; any strides with unit stride on d);
    keys, values [batch, groups, max_len, d] cache buffers (unit stride on d; `values is keys` for K=V —
    then each cached byte is read ONCE for both products); valid [batch, max_len] bool.
    Attends slots 0..length-1; slot s is visible iff valid[b, s] or s == length - 1 (the new token itself,
    already written to the cache at slot length-1). Query head h reads KV group h // (heads // groups).
    Returns [batch, heads, d] in q.dtype (fp32 accumulation, softmax scale 1/sqrt(d)).
    `block_n` / `split_len` (a multiple of block_n) override `plan`'s tile and split sizes."""
    batch, heads, d = q.shape
    groups, max_len = keys.shape[1], keys.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not q.dtype == keys.dtype == values.dtype:
        raise ValueError(f"q, keys and values must share one of fp32/bf16/fp16, got "
                         f"{q.dtype}, {keys.dtype}, {values.dtype}")
    if keys.shape != (batch, groups, max_len, d) or values.shape != keys.shape or heads % groups:
        raise ValueError(f"q {tuple(q.shape)} does not match cache buffers {tuple(keys.shape)} / {tuple(values.shape)}")
    if valid.shape != (batch, max_len) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool [batch, max_len] = [{batch}, {max_len}] tensor, got "
                         f"{valid.dtype} {tuple(valid.shape)}")
    if not 1 <= length <= max_len:
        raise ValueError(f"length {length} outside 1..{max_len}")
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("q, keys and values need unit stride on head_dim")
    r = heads // groups
    block_n, span = plan(batch, groups, length, d, q.device, block_n)
    split_len = split_len or span
    if block_n < 16 or block_n & (block_n - 1) or split_len % block_n:
        raise ValueError(f"block_n {block_n} must be a power of two >= 16 and split_len {split_len} a multiple of it")
    splits = triton.cdiv(length, split_len)
    out = torch.empty(batch, heads, d, dtype=q.dtype, device=q.device)
    if splits == 1:
        part, best, total = out, out, out  # written straight to `out`; the statistics are not stored
        part_strides, stat_strides = (out.stride(0), out.stride(1), 0), (0, 0, 0)
    else:
        part = torch.empty(batch, heads, splits, d, dtype=torch.float32, device=q.device)
        best = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        total = torch.empty_like(best)
        part_strides, stat_strides = part.stride()[:3], best.stride()
    _split_kernel[(splits, batch * groups)](
        q, keys, values, valid, part, best, total, length, split_len, LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), valid.stride(0), valid.stride(1),
        *part_strides, *stat_strides,
        GROUPS=groups, R=r, BLOCK_M=max(MIN_ROWS, triton.next_power_of_2(r)), BLOCK_N=block_n, D=d,
        KV_SHARED=values is keys, SINGLE_SPLIT=splits == 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if splits > 1:
        _combine_kernel[(batch * heads,)](
            part, best, total, out, splits, *part.stride()[:3], *best.stride(), out.stride(0), out.stride(1),
            HEADS=heads, BLOCK_S=triton.next_power_of_2(splits), D=d)
    return out


def decode_bytes_read(batch: int, groups: int, length: int, head_dim: int, element_size: int,
                      kv_shared: bool) -> int:
    """Bytes of cache one `triton_decode` call loads. Every split loads its whole tiles and the context's last
    tile loads only the slots below `length` (its masked rows are whole rows of head_dim * element_size >= 32
    bytes, i.e. whole memory sectors, so they are never fetched): exactly `length` slots per sequence and KV
    group, whatever the tiling. K=V loads one tensor, separate K and V two. (The `valid` flags, length bytes
    per sequence, and the queries are not cache and not counted.)"""
    return batch * groups * length * head_dim * element_size * (1 if kv_shared else 2)
