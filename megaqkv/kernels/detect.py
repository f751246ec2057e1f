"""Optional accelerator libraries (flash-attn, apex, Triton), each detected once and only used where it runs."""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch


@functools.lru_cache(maxsize=None)
def optional(module: str, attr: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None


def flash_attn_func():
    """flash_attn.flash_attn_func, or None when flash-attn is not importable."""
    return optional("flash_attn", "flash_attn_func")


def apex_layer_norm():
    """apex's fused_layer_norm_affine, or None when an NVIDIA apex build is not importable."""
    return optional("apex.normalization.fused_layer_norm", "fused_layer_norm_affine")


def on_accelerator(t: torch.Tensor) -> bool:
    """The CUDA-only libraries (flash-attn, apex) apply to this tensor."""
    return t.is_cuda


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors (slowly): how the tests check them."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Triton is importable and can run on this tensor: CUDA, or CPU under the interpreter."""
    return optional("triton", "jit") is not None and (t.is_cuda or (triton_interpreted() and t.device.type == "cpu"))


def flash_runs_on(t: torch.Tensor) -> bool:
    return (flash_attn_func() is not None and on_accelerator(t) and t.dtype in (torch.float16, torch.bfloat16)
            and t.shape[-1] <= 256)


_SELF_TESTS: dict = {}


def passes_self_test(key: tuple, run, tolerance: float) -> bool:
    """Whether a kernel compiles here and matches the PyTorch path on a small input: `run()` returns the max
    difference. Checked once per key (kernel, device, dtype, variant shape); a failure is reported once and
    `auto` falls back, so a Triton build that cannot compile our kernels costs a warning, not a run."""
    if key not in _SELF_TESTS:
        try:
            error = run()
            ok = error <= tolerance
            why = f"differs from PyTorch by {error:.3g}"
        except Exception as exc:  # noqa: BLE001 - a compiler or driver failure of an optional kernel
            ok, why = False, f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        if not ok:
            warnings.warn(f"{key[0]} kernel self-test {why} ({key[1:]}); falling back to the PyTorch path",
                          stacklevel=3)
        _SELF_TESTS[key] = ok
    return _SELF_TESTS[key]
