"""Optional accelerator kernels (flash-attn, apex) with PyTorch fallbacks.

Each is detected once, used only where it applies (CUDA tensors, half precision
for flash-attn), and otherwise falls back to `scaled_dot_product_attention` /
`F.layer_norm`, which give the same numbers within the kernel's own rounding.
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _optional(module: str, attr: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None


def flash_attn_func():
    """flash_attn.flash_attn_func, or None when flash-attn is not importable."""
    return _optional("flash_attn", "flash_attn_func")


def apex_layer_norm():
    """apex's fused_layer_norm_affine, or None when an NVIDIA apex build is not importable."""
    return _optional("apex.normalization.fused_layer_norm", "fused_layer_norm_affine")


def on_accelerator(t: torch.Tensor) -> bool:
    """The fused kernels here are CUDA-only."""
    return t.is_cuda


def select_attention_backend(requested: str, q: torch.Tensor) -> str:
    """'flash' or 'sdpa' for this call. `auto` takes flash-attn where it can run; `flash` insists."""
    flash_ok = (flash_attn_func() is not None and on_accelerator(q)
                and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256)
    if requested == "flash" and not flash_ok:
        if flash_attn_func() is None:
            raise RuntimeError("attention_backend is 'flash' but flash-attn is not importable; "
                               "install it (pip install 'megaqkv[flash]') or set attention_backend: auto")
        raise RuntimeError(f"attention_backend is 'flash' but flash-attn needs CUDA fp16/bf16 tensors with "
                           f"head_dim <= 256 (got {q.device.type} {q.dtype}, head_dim {q.shape[-1]}); "
                           "set attention_backend: auto to fall back to PyTorch SDPA")
    return "flash" if requested in ("auto", "flash") and flash_ok else "sdpa"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float,
                     backend: str) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d)) v.

    Layout [batch, seq, heads, head_dim]; k and v may have fewer heads than q
    (query head i reads KV head i // (heads_q / heads_kv)) and may be the same
    tensor (K=V). Neither kernel materialises the repeated K/V heads.
    """
    if select_attention_backend(backend, q) == "flash":
        return flash_attn_func()(q, k, v, dropout_p=dropout_p, causal=True)
    grouped = k.shape[2] != q.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, is_causal=True, enable_gqa=grouped)
    return out.transpose(1, 2)


class LayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm that runs apex's fused kernel on CUDA when apex is importable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = apex_layer_norm()
        if fused is not None and on_accelerator(x):
            return fused(input=x, weight=self.weight, bias=self.bias,
                         normalized_shape=self.normalized_shape, eps=self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
