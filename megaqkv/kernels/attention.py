"""Causal attention for training and prefill, read straight from the projection output.

Backends: `triton` (ours: a GQA/MQA or K=V tile loaded once per KV group for both products, one fused
gradient written), `flash` (FlashAttention-3 on Hopper when importable, else FlashAttention-2), `sdpa`
(PyTorch) and `math` (SDPA restricted to PyTorch's reference kernel: the slow, exact baseline that
bench/gpu_check.sh compares the fast kernels' losses with). `auto` takes the first that runs here from AUTO
(docs/kernels.md keeps the measurements behind that order).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .columns import Columns
from .detect import flash3_attn_func, flash_attn_func, flash_runs_on, flash_version, passes_self_test, triton_runs_on
from .norm import fused_layer_norm
from .roles import split_roles

HALF = (torch.float16, torch.bfloat16)
# device type -> training/prefill backends `auto` tries, fastest first (docs/kernels.md).
AUTO = {"cuda": ("triton", "flash", "sdpa"), "cpu": ("sdpa",)}


def triton_supports(t: torch.Tensor, head_dim: int, dropout_p: float) -> str | None:
    """Why the Triton kernel cannot take this call, or None when it can."""
    if not triton_runs_on(t):
        return "Triton is not importable or has no CUDA device here (pip install 'megaqkv[triton]')"
    if head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256:
        return f"the Triton kernel needs a power-of-two head_dim in [16, 256], got {head_dim}"
    if dropout_p > 0:
        return "the Triton kernel has no attention dropout"
    return None


def triton_self_test(cols: Columns, like: torch.Tensor) -> bool:
    """The Triton kernel's forward and backward on a small input of this variant equal SDPA's."""
    def run() -> float:
        from .triton_attention import triton_attention

        g = torch.Generator(like.device).manual_seed(0)
        srcs = [torch.randn(2, 80, width, generator=g, device=like.device, dtype=like.dtype).requires_grad_()
                for width in source_widths(cols)]
        up = torch.randn(2, 80, cols.heads, cols.head_dim, generator=g, device=like.device, dtype=like.dtype)
        ours = triton_attention(*srcs, cols) if len(srcs) == 2 else triton_attention(srcs[0], None, cols)
        got = [ours] + list(torch.autograd.grad(ours, srcs, up))
        q, k, v = split_roles(*srcs, cols) if len(srcs) == 2 else split_roles(srcs[0], None, cols)
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=k.shape[2] != q.shape[2]).transpose(1, 2)
        want = [ref] + list(torch.autograd.grad(ref, srcs, up))
        return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()
                   for a, b in zip(got, want))

    return passes_self_test(("Triton attention", like.device.type, like.dtype, cols), run, 2e-2)


def source_widths(cols: Columns) -> list[int]:
    """Columns of the projection output(s) that `cols` describes."""
    if cols.one_source:
        return [cols.groups * cols.q_group_stride]
    return [cols.heads * cols.head_dim, (1 if cols.kv_shared else 2) * cols.head_dim]


def choose_backend(requested: str, t: torch.Tensor, head_dim: int, dropout_p: float,
                   cols: Columns | None = None) -> str:
    """The backend this call runs on; an explicit request that cannot run here is an error, not a fallback.
    `auto` takes Triton only where its self-test on this variant (`cols`) passes."""
    why = {"triton": triton_supports(t, head_dim, dropout_p),
           "flash": None if flash_runs_on(t, head_dim, dropout_p) else
           ("flash-attn is not importable (pip install 'megaqkv[flash]')" if flash_version(t, dropout_p) is None
            else f"flash-attn needs CUDA fp16/bf16 tensors with head_dim <= 256 (got {t.device.type} {t.dtype}, "
                 f"head_dim {head_dim})"),
           "sdpa": None, "math": None}
    if requested != "auto":
        if why[requested]:
            raise RuntimeError(f"attention_backend is '{requested}' but {why[requested]}; "
                               "set attention_backend: auto to use what runs here")
        return requested
    for name in AUTO.get(t.device.type, ("sdpa",)):
        if why[name] is None and (name != "triton" or (t.dtype in HALF and (
                cols is None or triton_self_test(cols, t)))):
            return name
    return "sdpa"


class LeftPadding:
    """Left-padded prompts of a prefill: row b's first real position is starts[b]. Real tokens never see
    padding; a padding query sees only itself. The library backends need it as a mask, built once per
    prefill (not per layer) and freed with it."""

    def __init__(self, starts: torch.Tensor):
        self.starts = starts
        self._mask = None

    def mask(self, n: int) -> torch.Tensor:
        """[b, 1, n, n] boolean mask (True: may attend)."""
        if self._mask is None:
            pos = torch.arange(n, device=self.starts.device)
            self._mask = ((pos[None, :] <= pos[:, None]) & (pos[None, None, :] >= self.starts[:, None, None])
                          | (pos[None, :] == pos[:, None]))[:, None]
        return self._mask


def causal_attention(q_src: torch.Tensor, kv_src: torch.Tensor | None, cols: Columns, *, backend: str,
                     dropout_p: float = 0.0, padding: LeftPadding | None = None) -> torch.Tensor:
    """[b, s, heads, d] attention output of the projection output(s) described by `cols`; `padding`: the
    prefill of left-padded prompts."""
    name = choose_backend(backend, q_src, cols.head_dim, dropout_p, cols)
    if name == "triton":
        from .triton_attention import triton_attention  # imported on first use: TRITON_INTERPRET is read then
        return triton_attention(q_src, kv_src, cols, None if padding is None else padding.starts)
    q, k, v = split_roles(q_src, kv_src, cols)
    if name == "flash" and padding is None:
        fa3 = flash_version(q_src, dropout_p) == 3  # FA3 takes no dropout_p (chosen only without dropout)
        out = (flash3_attn_func() if fa3 else flash_attn_func())(
            q, k, v, causal=True, **({} if fa3 else {"dropout_p": dropout_p}))
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases return (out, softmax_lse)
    mask = None if padding is None else padding.mask(q.shape[1])
    with sdpa_kernel(SDPBackend.MATH) if name == "math" else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                                             enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def kernels_text(backend: str, like: torch.Tensor, cols: Columns, dropout_p: float) -> str:
    """What a run prints: the kernels its attention (`cols`) and LayerNorm use for tensors like `like` (device,
    dtype), after any self-test `auto` runs; flash-attn is named by version (flash-3, flash-2)."""
    from .decode import decode_backend

    name = choose_backend(backend, like, cols.head_dim, dropout_p, cols)
    if name == "flash":
        name = f"flash-{flash_version(like, dropout_p)}"
    return (f"attention kernels: training and prefill {name} (attention_backend: {backend} on {like.device.type}), "
            f"decoding {decode_backend(like, 1)}; LayerNorm: "
            f"{'apex fused' if fused_layer_norm(like) is not None else 'torch'}")

