"""Causal flash attention (FlashAttention-2 style) read from and differentiated into the projection output.

The kernels take queries, keys and values straight from the projection output(s) by column offsets
(`Columns`) and write the projection's gradient in the same layout, so no q/k/v copy, no repeated KV
head and no summed per-role gradient exists in memory. A program owns one (sequence, KV group) and a
block of query positions for all r query heads of the group, stacked as the rows of one tile: a GQA/MQA
key/value tile is loaded once per group, and with K=V the one loaded tile serves both q·kᵀ and p·v.
Backward: a dK/dV kernel per key block (K=V: dK + dV in one accumulator, one tile written into the one
kv column), then a dQ kernel per query block; for Q=K the query column is the key column, so the dQ
kernel adds its dQ to the dK already there. Every column of the projection belongs to a role, so the
gradient is written whole into an uninitialised tensor.

Scores are kept in log2 units (scale log2(e)/sqrt(d), exp2); the forward saves each row's fp32
logsumexp (log2 units) for the backward. Accumulation is fp32 for every input dtype.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .columns import Columns

LOG2E = 1.4426950408889634
MIN_ROWS = 16  # tl.dot needs at least 16 rows: a tile stacks max(16 // r, 1) or more positions
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so a row that has seen only masked keys stays NaN-free


@triton.jit
def _mask(s, qp, kp, start, DIAG: tl.constexpr, HAS_STARTS: tl.constexpr):
    """s with the (query qp, key kp) pairs that may not attend set to -inf; qp and kp broadcast to s."""
    if DIAG:
        s = tl.where(kp <= qp, s, float("-inf"))
    if HAS_STARTS:
        s = tl.where((kp >= start) | (kp == qp), s, float("-inf"))
    return s


@triton.jit
def _rows(qs, n, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Stacked tile rows m = position * R_PAD + head: (position, head in group, row is real)."""
    m = tl.arange(0, BLOCK_Q * R_PAD)
    qp = qs + m // R_PAD
    j = m % R_PAD
    return qp, j, (qp < n) & (j < R)


@triton.jit
def _fwd_tiles(acc, best, total, q, k_ptrs, v_ptrs, s_kn, qp, start, n, lo, hi, qk_scale,
               BLOCK_N: tl.constexpr, KV_SHARED: tl.constexpr, DIAG: tl.constexpr,
               HAS_STARTS: tl.constexpr, PRECISION: tl.constexpr):
    for ks in range(lo, hi, BLOCK_N):
        kp = ks + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptrs + kp[:, None] * s_kn, mask=(kp < n)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _mask(s, qp[:, None], kp[None, :], start, DIAG, HAS_STARTS)
        new_best = tl.maximum(best, tl.max(s, 1))
        p = tl.exp2(s - new_best[:, None])
        rescale = tl.exp2(best - new_best)
        total = total * rescale + tl.sum(p, 1)
        if KV_SHARED:
            v = k
        else:
            v = tl.load(v_ptrs + kp[:, None] * s_kn, mask=(kp < n)[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        best = new_best
    return acc, best, total


@triton.jit
def _fwd_kernel(q_ptr, kv_ptr, o_ptr, lse_ptr, starts_ptr, n, qk_scale,
                s_qb, s_qn, s_kb, s_kn, q_base, q_gs, k_base, v_base, kv_gs,
                GROUPS: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr, KV_SHARED: tl.constexpr, HAS_STARTS: tl.constexpr,
                PRECISION: tl.constexpr):
    qs = tl.program_id(0) * BLOCK_Q
    b = (tl.program_id(1) // GROUPS).to(tl.int64)
    g = tl.program_id(1) % GROUPS
    qp, j, row_ok = _rows(qs, n, R, R_PAD, BLOCK_Q)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + b * s_qb + qp[:, None] * s_qn + (q_base + g * q_gs + j * D)[:, None] + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    k_ptrs = kv_ptr + b * s_kb + k_base + g * kv_gs + dims[None, :]
    v_ptrs = kv_ptr + b * s_kb + v_base + g * kv_gs + dims[None, :]
    start = 0
    if HAS_STARTS:
        start = tl.load(starts_ptr + b)

    acc = tl.zeros([BLOCK_Q * R_PAD, D], tl.float32)
    best = tl.full([BLOCK_Q * R_PAD], NEG_BIG, tl.float32)
    total = tl.zeros([BLOCK_Q * R_PAD], tl.float32)
    hi = tl.minimum(n, qs + BLOCK_Q)
    mid = (qs + 1) // BLOCK_N * BLOCK_N  # key blocks below this end at or before the tile's first position
    acc, best, total = _fwd_tiles(acc, best, total, q, k_ptrs, v_ptrs, s_kn, qp, start, n, 0, mid, qk_scale,
                                  BLOCK_N, KV_SHARED, False, HAS_STARTS, PRECISION)
    acc, best, total = _fwd_tiles(acc, best, total, q, k_ptrs, v_ptrs, s_kn, qp, start, n, mid, hi, qk_scale,
                                  BLOCK_N, KV_SHARED, True, HAS_STARTS, PRECISION)

    heads = g * R + j
    row = (b * n + qp) * (GROUPS * R) + heads  # [batch, seq, heads] order of `out` and the statistics
    tl.store(o_ptr + row[:, None] * D + dims[None, :], (acc / total[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + row, best + tl.log2(total), mask=row_ok)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, rows, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """delta = rowsum(dO * O) per (batch, position, head), fp32."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ok = r < rows
    off = r[:, None] * D + tl.arange(0, D)[None, :]
    o = tl.load(o_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + r, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptrs, s_qn, do_ptr, lse_ptr, delta_ptr, stat_base, kp, start, n, lo, hi,
                qk_scale, sm_scale, GROUPS: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                BLOCK_Q: tl.constexpr, D: tl.constexpr, KV_SHARED: tl.constexpr, DIAG: tl.constexpr,
                HAS_STARTS: tl.constexpr, PRECISION: tl.constexpr):
    dims = tl.arange(0, D)
    for qs in range(lo, hi, BLOCK_Q):
        qp, j, row_ok = _rows(qs, n, R, R_PAD, BLOCK_Q)
        # padded rows load zeros (q, dO, lse, delta), so they add exactly nothing
        q = tl.load(q_ptrs + qp[:, None] * s_qn + (j * D)[:, None], mask=row_ok[:, None], other=0.0)
        row = stat_base + qp * (GROUPS * R) + j
        do = tl.load(do_ptr + row[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + row, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + row, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [keys, stacked rows]
        s_t = _mask(s_t, qp[None, :], kp[:, None], start, DIAG, HAS_STARTS)
        p_t = tl.exp2(s_t - lse[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :]) * sm_scale).to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=PRECISION)
        if KV_SHARED:  # the one K=V tile's gradient: dK + dV in one accumulator
            dk += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(q_ptr, kv_ptr, do_ptr, lse_ptr, delta_ptr, dkv_ptr, starts_ptr, n, qk_scale, sm_scale,
                 s_qb, s_qn, s_kb, s_kn, s_gb, s_gn, q_base, q_gs, k_base, v_base, kv_gs,
                 GROUPS: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, KV_SHARED: tl.constexpr, HAS_STARTS: tl.constexpr,
                 PRECISION: tl.constexpr):
    ks = tl.program_id(0) * BLOCK_N
    b = (tl.program_id(1) // GROUPS).to(tl.int64)
    g = tl.program_id(1) % GROUPS
    kp = ks + tl.arange(0, BLOCK_N)
    key_ok = (kp < n)[:, None]
    dims = tl.arange(0, D)
    k_off = b * s_kb + kp[:, None] * s_kn + k_base + g * kv_gs + dims[None, :]
    v_off = b * s_kb + kp[:, None] * s_kn + v_base + g * kv_gs + dims[None, :]
    k = tl.load(kv_ptr + k_off, mask=key_ok, other=0.0)
    if KV_SHARED:
        v = k
    else:
        v = tl.load(kv_ptr + v_off, mask=key_ok, other=0.0)
    start = 0
    if HAS_STARTS:
        start = tl.load(starts_ptr + b)
    q_ptrs = q_ptr + b * s_qb + q_base + g * q_gs + dims[None, :]
    stat_base = b * n * (GROUPS * R) + g * R

    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = dk  # its own accumulator unless K=V (then untouched and never stored)
    lo = ks // BLOCK_Q * BLOCK_Q  # the first query block that can see this key block
    mid = tl.minimum(tl.cdiv(ks + BLOCK_N - 1, BLOCK_Q) * BLOCK_Q, n)  # from here every query sees every key
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, s_qn, do_ptr, lse_ptr, delta_ptr, stat_base, kp, start, n, lo, mid,
                         qk_scale, sm_scale, GROUPS, R, R_PAD, BLOCK_Q, D, KV_SHARED, True, HAS_STARTS, PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, s_qn, do_ptr, lse_ptr, delta_ptr, stat_base, kp, start, n, mid, n,
                         qk_scale, sm_scale, GROUPS, R, R_PAD, BLOCK_Q, D, KV_SHARED, False, HAS_STARTS, PRECISION)

    g_off = b * s_gb + kp[:, None] * s_gn + dims[None, :]
    tl.store(dkv_ptr + g_off + k_base + g * kv_gs, dk.to(dkv_ptr.dtype.element_ty), mask=key_ok)
    if not KV_SHARED:
        tl.store(dkv_ptr + g_off + v_base + g * kv_gs, dv.to(dkv_ptr.dtype.element_ty), mask=key_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, s_kn, qp, start, n, lo, hi, qk_scale, sm_scale,
              BLOCK_N: tl.constexpr, KV_SHARED: tl.constexpr, DIAG: tl.constexpr, HAS_STARTS: tl.constexpr,
              PRECISION: tl.constexpr):
    for ks in range(lo, hi, BLOCK_N):
        kp = ks + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptrs + kp[:, None] * s_kn, mask=(kp < n)[:, None], other=0.0)
        if KV_SHARED:
            v = k
        else:
            v = tl.load(v_ptrs + kp[:, None] * s_kn, mask=(kp < n)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _mask(s, qp[:, None], kp[None, :], start, DIAG, HAS_STARTS)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None]) * sm_scale).to(k.dtype)
        dq += tl.dot(ds, k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(q_ptr, kv_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, starts_ptr, n, qk_scale, sm_scale,
               s_qb, s_qn, s_kb, s_kn, s_gb, s_gn, q_base, q_gs, k_base, v_base, kv_gs,
               GROUPS: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_N: tl.constexpr, D: tl.constexpr, KV_SHARED: tl.constexpr, HAS_STARTS: tl.constexpr,
               ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr):
    qs = tl.program_id(0) * BLOCK_Q
    b = (tl.program_id(1) // GROUPS).to(tl.int64)
    g = tl.program_id(1) % GROUPS
    qp, j, row_ok = _rows(qs, n, R, R_PAD, BLOCK_Q)
    dims = tl.arange(0, D)
    col = (q_base + g * q_gs + j * D)[:, None] + dims[None, :]
    q = tl.load(q_ptr + b * s_qb + qp[:, None] * s_qn + col, mask=row_ok[:, None], other=0.0)
    row = (b * n + qp) * (GROUPS * R) + g * R + j
    do = tl.load(do_ptr + row[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + row, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + row, mask=row_ok, other=0.0)
    k_ptrs = kv_ptr + b * s_kb + k_base + g * kv_gs + dims[None, :]
    v_ptrs = kv_ptr + b * s_kb + v_base + g * kv_gs + dims[None, :]
    start = 0
    if HAS_STARTS:
        start = tl.load(starts_ptr + b)

    dq = tl.zeros([BLOCK_Q * R_PAD, D], tl.float32)
    hi = tl.minimum(n, qs + BLOCK_Q)
    mid = (qs + 1) // BLOCK_N * BLOCK_N
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, s_kn, qp, start, n, 0, mid, qk_scale, sm_scale,
                   BLOCK_N, KV_SHARED, False, HAS_STARTS, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, s_kn, qp, start, n, mid, hi, qk_scale, sm_scale,
                   BLOCK_N, KV_SHARED, True, HAS_STARTS, PRECISION)

    out = dq_ptr + b * s_gb + qp[:, None] * s_gn + col
    if ACCUMULATE:  # Q=K: the dK/dV kernel already wrote dK into this column
        dq += tl.load(out, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(out, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


def _blocks(device: torch.device, head_dim: int, r_pad: int, backward: bool) -> dict:
    """Tile sizes and launch options: stacked query rows (BLOCK_Q positions × r_pad heads), keys per tile.
    CPU tensors (the interpreter) get 16-row tiles so the tests stay fast."""
    if device.type != "cuda":
        rows, keys, warps, stages = 16, 16, 1, 1
    elif backward:
        rows, keys = (64, 64) if head_dim <= 128 else (32, 32)
        warps, stages = (4 if head_dim <= 64 else 8), 2
    else:
        rows, keys = (128, 64) if head_dim <= 128 else (64, 32)
        warps, stages = (4 if head_dim <= 64 else 8), (3 if head_dim <= 64 else 2)
    return dict(BLOCK_Q=max(1, max(rows, MIN_ROWS) // r_pad), BLOCK_N=keys, num_warps=warps, num_stages=stages)


def _check_covered(width: int, groups: int, group_stride: int, offsets: list[int], d: int, what: str) -> None:
    """The roles' slots tile every column of a source exactly once (its gradient is allocated uninitialised)."""
    block = width // groups
    if width != groups * block or (groups > 1 and group_stride != block) or sorted(offsets) != list(range(0, block, d)):
        raise ValueError(f"the columns do not tile {what} ({width} columns, {groups} groups, role offsets "
                         f"{sorted(offsets)} per group): every column must belong to exactly one role")


def _check(q_src: torch.Tensor, kv_src: torch.Tensor | None, cols: Columns) -> None:
    d, r = cols.head_dim, cols.q_per_group
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"triton_attention needs a power-of-two head_dim in [16, 256], got {d}")
    if q_src.dim() != 3 or q_src.dtype not in DTYPES:
        raise ValueError(f"q_src must be a [batch, seq, columns] fp32/bf16/fp16 tensor, got {q_src.dtype} "
                         f"{tuple(q_src.shape)}")
    if cols.one_source != (kv_src is None):
        raise ValueError("kv_src must be None exactly when cols.one_source (keys and values read from q_src)")
    q_offsets = [] if cols.q_is_k else [cols.q_base + j * d for j in range(r)]
    kv_offsets = [cols.k_base] + ([] if cols.kv_shared else [cols.v_base])
    if cols.q_is_k and r != 1:
        raise ValueError(f"Q=K needs one query head per group, got {r}")
    if kv_src is None:
        if cols.q_group_stride != cols.kv_group_stride:
            raise ValueError("one source needs the same group stride for queries and keys/values")
        _check_covered(q_src.shape[-1], cols.groups, cols.q_group_stride, q_offsets + kv_offsets, d, "q_src")
        return
    if kv_src.dtype != q_src.dtype or kv_src.device != q_src.device or kv_src.shape[:2] != q_src.shape[:2]:
        raise ValueError(f"kv_src {kv_src.dtype} {tuple(kv_src.shape)} on {kv_src.device} does not match q_src "
                         f"{q_src.dtype} {tuple(q_src.shape)} on {q_src.device}")
    _check_covered(q_src.shape[-1], cols.groups, cols.q_group_stride, q_offsets, d, "q_src")
    _check_covered(kv_src.shape[-1], cols.groups, cols.kv_group_stride, kv_offsets, d, "kv_src")


def _common(q_src, kv_src, cols: Columns, starts, backward: bool) -> tuple[tuple, dict, tuple]:
    """Kernel arguments shared by the launches: (scalars and source strides, constexprs and launch options,
    column offsets)."""
    n, d, r = q_src.shape[1], cols.head_dim, cols.q_per_group
    r_pad = triton.next_power_of_2(r)
    opts = _blocks(q_src.device, d, r_pad, backward)
    opts.update(GROUPS=cols.groups, R=r, R_PAD=r_pad, D=d, KV_SHARED=cols.kv_shared, HAS_STARTS=starts is not None,
                PRECISION="ieee" if q_src.dtype == torch.float32 else "tf32")
    sm_scale = 1.0 / math.sqrt(d)
    args = (n, sm_scale * LOG2E) + ((sm_scale,) if backward else ()) + (
        q_src.stride(0), q_src.stride(1), kv_src.stride(0), kv_src.stride(1))
    cols_args = (cols.q_base, cols.q_group_stride, cols.k_base, cols.v_base, cols.kv_group_stride)
    return args, opts, cols_args


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_src, kv_src, cols, starts):
        src = q_src if kv_src is None else kv_src
        b, n, _ = q_src.shape
        out = torch.empty(b, n, cols.heads, cols.head_dim, dtype=q_src.dtype, device=q_src.device)
        lse = torch.empty(b, n, cols.heads, dtype=torch.float32, device=q_src.device)
        args, opts, cols_args = _common(q_src, src, cols, starts, backward=False)
        starts_arg = out if starts is None else starts  # never read without HAS_STARTS
        grid = (triton.cdiv(n, opts["BLOCK_Q"]), b * cols.groups)
        _fwd_kernel[grid](q_src, src, out, lse, starts_arg, *args, *cols_args, **opts)
        ctx.save_for_backward(q_src, kv_src, out, lse, starts)
        ctx.cols = cols
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_src, kv_src, out, lse, starts = ctx.saved_tensors
        cols = ctx.cols
        src = q_src if kv_src is None else kv_src
        b, n, _ = q_src.shape
        grad_out = grad_out.contiguous()
        delta = torch.empty_like(lse)
        block_r = 64 if q_src.is_cuda else 16
        _delta_kernel[(triton.cdiv(lse.numel(), block_r),)](out, grad_out, delta, lse.numel(), D=cols.head_dim,
                                                             BLOCK_R=block_r)
        grad_q = torch.empty(q_src.shape, dtype=q_src.dtype, device=q_src.device)
        grad_kv = grad_q if kv_src is None else torch.empty(kv_src.shape, dtype=src.dtype, device=src.device)
        args, opts, cols_args = _common(q_src, src, cols, starts, backward=True)
        starts_arg = out if starts is None else starts
        common = (q_src, src, grad_out, lse, delta)
        grid = (triton.cdiv(n, opts["BLOCK_N"]), b * cols.groups)
        _dkdv_kernel[grid](*common, grad_kv, starts_arg, *args, *grad_kv.stride()[:2], *cols_args, **opts)
        grid = (triton.cdiv(n, opts["BLOCK_Q"]), b * cols.groups)  # after dK/dV: with Q=K it adds to dK
        _dq_kernel[grid](*common, grad_q, starts_arg, *args, *grad_q.stride()[:2], *cols_args,
                         ACCUMULATE=cols.q_is_k, **opts)
        return grad_q, (None if kv_src is None else grad_kv), None, None


def triton_attention(q_src: torch.Tensor, kv_src: torch.Tensor | None, cols: Columns,
                     starts: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax(q kᵀ/√d) v of the projection output(s) described by `cols`.

    q_src [batch, seq, Cq] (other strides than the column one arbitrary); kv_src [batch, seq, Ckv], or None
    when `cols.one_source` (keys and values then come from q_src). Returns out [batch, seq, cols.heads,
    head_dim] contiguous in q_src.dtype, head g * r + j; differentiable w.r.t. q_src and kv_src, whose
    gradients have their shape (a source whose column stride is not 1 is copied first). `starts` [batch]
    (int, left-padded prefill): key kp is visible to query qp iff kp <= qp and (kp >= starts[b] or kp == qp).
    """
    _check(q_src, kv_src, cols)
    q_src = q_src if q_src.stride(-1) == 1 else q_src.contiguous()
    if kv_src is not None and kv_src.stride(-1) != 1:
        kv_src = kv_src.contiguous()
    if starts is not None:
        if starts.shape != (q_src.shape[0],) or starts.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"starts must be an int32/int64 [batch] tensor, got {starts.dtype} {tuple(starts.shape)}")
        starts = starts.to(device=q_src.device, dtype=torch.int32).contiguous()
    return _Attention.apply(q_src, kv_src, cols, starts)
