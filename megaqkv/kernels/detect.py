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
    """FlashAttention-2: flash_attn.flash_attn_func, or None when flash-attn is not importable."""
    return optional("flash_attn", "flash_attn_func")


def flash3_attn_func():
    """FlashAttention-3 (the Hopper build, module flash_attn_interface): its flash_attn_func, or None."""
    return optional("flash_attn_interface", "flash_attn_func")


def flash_version(t: torch.Tensor, dropout_p: float) -> int | None:
    """The FlashAttention a call on `t` uses: 3 on Hopper (compute capability 9.x) when it imports and no
    attention dropout is asked (FA3 has none), else 2 when flash-attn imports; None when neither does."""
    if (dropout_p == 0 and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] == 9
            and flash3_attn_func() is not None):
        return 3
    return 2 if flash_attn_func() is not None else None


def apex_layer_norm():
    """apex's fused_layer_norm_affine, or None unless apex *and its CUDA extension* import: an apex built
    without --cuda_ext imports fine and fails only inside the first forward, once the run has started."""
    if optional("fused_layer_norm_cuda", "forward_affine") is None:
        return None
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


def flash_runs_on(t: torch.Tensor, head_dim: int | None = None, dropout_p: float = 0.0) -> bool:
    """FlashAttention takes attention over heads of `head_dim` (default: `t`'s last dimension) for tensors
    like `t`. The head dimension is passed, not read from `t`: the projection output is far wider."""
    return (flash_version(t, dropout_p) is not None and on_accelerator(t)
            and t.dtype in (torch.float16, torch.bfloat16) and (head_dim or t.shape[-1]) <= 256)


_SELF_TESTS: dict = {}


def passes_self_test(key: tuple, run, tolerance: float) -> bool:
    """Whether a kernel compiles here and matches the PyTorch path on a small input: `run()` returns the max
    difference. Checked once per key (kernel, device, dtype, variant shape); a failure is reported once and
    `auto` falls back, so a Triton build that cannot compile our kernels costs a warning, not a run."""
    if key not in _SELF_TESTS:
        try:
            with torch.enable_grad():  # the first call may come from an evaluation under no_grad
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
