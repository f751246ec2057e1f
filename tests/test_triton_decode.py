"""The Triton flash-decoding kernel under Triton's interpreter (CPU tensors), against plain masked softmax attention."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates, so before the kernel module is imported

import types

import pytest
import torch

pytest.importorskip("triton")

from megaqkv.kernels import triton_decode as td  # noqa: E402
from megaqkv.kernels.decode import blocked_attention  # noqa: E402

FP32_TOL = 1e-5
MAX_LEN = 64


def reference(q, keys, values, valid, length):
    """Softmax over the visible slots 0..length-1 in fp32, the KV heads repeated for each query head."""
    b, heads, d = q.shape
    r = heads // keys.shape[1]
    k = keys[:, :, :length].float().repeat_interleave(r, 1)
    v = values[:, :, :length].float().repeat_interleave(r, 1)
    seen = valid[:, :length].clone()
    seen[:, length - 1] = True
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), k) / d ** 0.5
    probs = scores.masked_fill(~seen[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhn,bhnd->bhd", probs, v)


def make_cache(batch, groups, d, shared, dtype=torch.float32, max_len=MAX_LEN, length=MAX_LEN, seed=0):
    """Cache buffers whose slots from `length` on hold garbage (NaN and huge values) the kernel must never read."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, groups, max_len, d, generator=g).to(dtype)
    values = keys if shared else torch.randn(batch, groups, max_len, d, generator=g).to(dtype)
    for t in {id(keys): keys, id(values): values}.values():
        t[:, :, length:] = float("nan")
        t[:, :, length + 1::2] = 3e38 if dtype == torch.float32 else 6e4
    return keys, values


def ragged_valid(batch, max_len=MAX_LEN):
    """Row 0 full; row 1 left-padded by 5; row 2 left-padded by 10 with a finished (False) slot at 20."""
    valid = torch.ones(batch, max_len, dtype=torch.bool)
    valid[1, :5] = False
    valid[2, :10] = False
    valid[2, 20] = False
    return valid


def max_diff(out, q, keys, values, valid, length):
    want = reference(q, keys, values, valid, length)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    return (out.float() - want).abs().max().item()


@pytest.mark.parametrize("groups", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("shared", [True, False], ids=["k=v", "k,v"])
@pytest.mark.parametrize("length", [1, 7, 45, MAX_LEN])
def test_matches_reference(groups, shared, length):
    """Ragged lengths inside a longer cache, left padding, a finished row; one split (the CPU plan) and
    16-slot splits. At length 7 row 2 sees only the new token."""
    keys, values = make_cache(3, groups, 16, shared, length=length)
    q = torch.randn(3, 4, 16)
    valid = ragged_valid(3)
    for split_len in (None, 16):
        out = td.triton_decode(q, keys, values, valid, length, split_len=split_len)
        assert max_diff(out, q, keys, values, valid, length) <= FP32_TOL


def test_only_the_new_token_visible():
    keys, values = make_cache(2, 2, 16, shared=False, length=30)
    valid = torch.zeros(2, MAX_LEN, dtype=torch.bool)
    valid[1, :30] = True
    q = torch.randn(2, 4, 16)
    out = td.triton_decode(q, keys, values, valid, 30, split_len=16)
    assert max_diff(out, q, keys, values, valid, 30) <= FP32_TOL
    torch.testing.assert_close(out[0], values[0, [0, 0, 1, 1], 29], rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("shared", [True, False], ids=["k=v", "k,v"])
def test_fully_masked_splits(shared):
    """Four 16-slot splits; row 1 is padded over the first two, so they see nothing (max -inf, sum 0)."""
    keys, values = make_cache(2, 2, 16, shared)
    valid = torch.ones(2, MAX_LEN, dtype=torch.bool)
    valid[1, :32] = False
    q = torch.randn(2, 8, 16)
    out = td.triton_decode(q, keys, values, valid, MAX_LEN, block_n=16, split_len=16)
    assert max_diff(out, q, keys, values, valid, MAX_LEN) <= FP32_TOL


def test_strided_query_and_cache_views():
    """q a slice [:, 0] of [b, n, heads, d]; the cache a slice of a larger buffer (as a TP rank's KV heads)."""
    big = torch.randn(2, 3, 4, 16)
    q = big[:, 0]
    assert not q.is_contiguous()
    whole, _ = make_cache(2, 4, 16, shared=True, max_len=48, length=40)
    keys = whole[:, 1:3]
    valid = ragged_valid(3, 48)[1:]
    out = td.triton_decode(q, keys, keys, valid, 40, split_len=16)
    assert max_diff(out, q, keys, keys, valid, 40) <= FP32_TOL


@pytest.mark.parametrize("d,groups", [(64, 2), (128, 1)])
def test_real_head_dims(d, groups):
    keys, values = make_cache(2, groups, d, shared=groups == 1, length=50)
    valid = ragged_valid(3)[1:]
    q = torch.randn(2, 4, d)
    out = td.triton_decode(q, keys, values, valid, 50, block_n=16, split_len=32)
    assert max_diff(out, q, keys, values, valid, 50) <= FP32_TOL


def test_half_precision_and_blocked_path():
    """fp16 (16-bit tiles, p cast to fp16 for p·v as on the GPU) against the fp32 reference and the
    blocked PyTorch path cached_attention runs off CUDA."""
    keys, values = make_cache(3, 2, 16, shared=False, dtype=torch.float16, length=45)
    valid = ragged_valid(3)
    q = torch.randn(3, 4, 16).half()
    out = td.triton_decode(q, keys, values, valid, 45, split_len=16)
    assert max_diff(out, q, keys, values, valid, 45) <= 2e-3
    blocked = blocked_attention(q[:, None], keys, values, valid, 44)[:, 0]
    torch.testing.assert_close(out, blocked, rtol=0, atol=2e-3)


def test_rejects_unsupported_shapes():
    q = torch.randn(1, 2, 24)
    keys = torch.randn(1, 1, 8, 24)
    valid = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="power of two"):
        td.triton_decode(q, keys, keys, valid, 4)
    q, keys = torch.randn(1, 2, 16), torch.randn(1, 1, 8, 16)
    for length in (0, 9):
        with pytest.raises(ValueError, match="length"):
            td.triton_decode(q, keys, keys, valid, length)
    with pytest.raises(ValueError, match="share"):
        td.triton_decode(q.double(), keys.double(), keys.double(), valid, 4)


def test_split_plan(monkeypatch):
    """CUDA: ~2 programs per SM, splits of at least 4 tiles, none at large batch. CPU: 16-slot tiles, few splits."""
    monkeypatch.setattr(td.torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))
    cuda = torch.device("cuda")
    assert td.plan(1, 8, 32768, 128, cuda) == (64, 1024)  # 32 splits x 8 groups: 256 programs for 264
    assert td.plan(64, 8, 32768, 128, cuda) == (64, 32768)  # 512 programs already: one split
    assert td.plan(1, 1, 200, 64, cuda) == (64, 256)  # 4 tiles: too short to split
    assert td.plan(1, 1, 40 * 16, 64, torch.device("cpu")) == (16, 320)


def test_bytes_read():
    """K=V loads half of separate K and V; a call loads exactly `length` slots per sequence and group: the
    splits' whole tiles plus the last tile's unmasked rows."""
    for batch, groups, length, d, element in [(1, 8, 1000, 128, 2), (4, 1, 45, 64, 4), (2, 2, 1, 16, 2)]:
        shared = td.decode_bytes_read(batch, groups, length, d, element, kv_shared=True)
        separate = td.decode_bytes_read(batch, groups, length, d, element, kv_shared=False)
        assert 2 * shared == separate
        _, split_len = td.plan(batch, groups, length, d, torch.device("cpu"))
        rows = sum(min(split_len, length - start) for start in range(0, length, split_len))
        assert shared == batch * groups * rows * d * element == batch * groups * length * d * element
