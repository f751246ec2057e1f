"""The Triton flash-attention kernel under Triton's interpreter (CPU tensors), against PyTorch attention of
q/k/v sliced out of the same projection output, forward and the whole projection gradient."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates, so before the kernel module is imported

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from megaqkv.kernels.columns import Columns  # noqa: E402
from megaqkv.kernels.triton_attention import triton_attention  # noqa: E402
from megaqkv.variants import AttentionLayout  # noqa: E402

FP32_TOL = 1e-5
D = 16

# (sharing, num_heads, num_kv_heads): every variant, with GQA (2 groups) and MQA where the sharing allows
LAYOUTS = [("none", 4, 4), ("none", 4, 2), ("none", 4, 1), ("kv", 4, 4), ("kv", 4, 2), ("kv", 4, 1),
           ("qk", 2, 2), ("qkv", 2, 2)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def roles(q_src, kv_src, cols):
    """q [b, n, heads, d], k and v [b, n, groups, d] by plain column indexing (differentiable views)."""
    d, kv = cols.head_dim, q_src if kv_src is None else kv_src
    q = torch.stack([q_src[..., cols.q_base + g * cols.q_group_stride + j * d:][..., :d]
                     for g in range(cols.groups) for j in range(cols.q_per_group)], 2)
    k = torch.stack([kv[..., cols.k_base + g * cols.kv_group_stride:][..., :d] for g in range(cols.groups)], 2)
    v = torch.stack([kv[..., cols.v_base + g * cols.kv_group_stride:][..., :d] for g in range(cols.groups)], 2)
    return q, k, v


def reference(q_src, kv_src, cols, starts=None):
    """PyTorch attention in fp64 of the same sources (gradients flow back through the cast), so the fp32
    tolerance measures the kernel's rounding rather than the reference's."""
    q_src, kv_src = q_src.double(), None if kv_src is None else kv_src.double()
    q, k, v = (t.transpose(1, 2) for t in roles(q_src, kv_src, cols))
    if starts is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cols.q_per_group > 1)
    else:  # explicit masked softmax: kp <= qp and (kp >= starts[b] or kp == qp)
        n = q.shape[2]
        pos = torch.arange(n)
        seen = (pos[None, :] <= pos[:, None]) & ((pos[None, None, :] >= starts[:, None, None])
                                                 | (pos[None, :] == pos[:, None]))
        k, v = (t.repeat_interleave(cols.q_per_group, 1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) / cols.head_dim ** 0.5
        out = scores.masked_fill(~seen[:, None], float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2)


def compare(cols, q_src, kv_src=None, starts=None, leaves=None):
    """Kernel and reference on the same sources and one random upstream gradient; max abs differences of the
    output, of dq (the query columns' gradient) and of every leaf's gradient."""
    leaves = leaves or [t for t in (q_src, kv_src) if t is not None]
    srcs = [t for t in (q_src, kv_src) if t is not None]
    got = []
    for fn in (triton_attention, reference):
        for t in leaves + srcs:
            t.grad = None
            if not t.is_leaf:
                t.retain_grad()
        out = fn(q_src, kv_src, cols, starts)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(upstream)
        grads = [t.grad.clone() for t in srcs]
        dq = roles(grads[0], grads[1] if kv_src is not None else None, cols)[0]
        got.append((out.detach(), dq, grads, [t.grad.clone() for t in leaves]))
    (out, dq, grads, leaf_grads), (want, want_dq, want_grads, want_leaf_grads) = got
    assert out.shape == (q_src.shape[0], q_src.shape[1], cols.heads, cols.head_dim) and out.is_contiguous()
    assert out.dtype == q_src.dtype and all(g.shape == t.shape for g, t in zip(grads, srcs))
    if q_src.shape[1] > 1:  # (one position: softmax over one key, so q and k get exactly zero gradient)
        for g in want_grads:  # every column of every source carries gradient: an unwritten one cannot pass
            assert (g != 0).any(0).any(0).all()
    return {"out": (out.float() - want.float()).abs().max().item(),
            "dq": (dq.float() - want_dq.float()).abs().max().item(),
            "grad": max((g.float() - w.float()).abs().max().item() for g, w in zip(leaf_grads, want_leaf_grads))}


def check(diffs, tol=FP32_TOL, label=""):
    print(f"{label} max|diff| " + " ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= tol, diffs


@pytest.mark.parametrize("n", [1, 13, 37])
@pytest.mark.parametrize("sharing,heads,kv_heads", LAYOUTS, ids=[f"{s}-{h}-{k}" for s, h, k in LAYOUTS])
def test_fused_variants(sharing, heads, kv_heads, n):
    """Every variant's fused projection (one source), ragged lengths against 16-row / 16-key tiles."""
    lay = AttentionLayout(sharing, heads, kv_heads, D)
    cols = Columns.fused(lay)
    src = torch.randn(2, n, lay.rows, requires_grad=True)
    check(compare(cols, src), label=f"{sharing} {heads}/{kv_heads} n={n}")


@pytest.mark.parametrize("heads", [2, 3])
@pytest.mark.parametrize("kv_shared", [True, False], ids=["k=v", "k,v"])
def test_split_sources(kv_shared, heads):
    """A TP rank with fewer KV heads than ranks: q_proj output and the one group's kv_proj rows, separate
    tensors and gradients; 3 heads pad the stacked tile to 4."""
    cols = Columns.split(heads, 32, kv_shared)
    q_src = torch.randn(2, 29, heads * 32, requires_grad=True)
    kv_src = torch.randn(2, 29, 32 if kv_shared else 64, requires_grad=True)
    check(compare(cols, q_src, kv_src), label=f"split heads={heads} kv_shared={kv_shared}")


@pytest.mark.parametrize("sharing,heads,kv_heads", [("none", 4, 2), ("qkv", 2, 2)])
def test_left_padding(sharing, heads, kv_heads):
    """starts: forward and gradients against the masked softmax; a row's real positions equal the attention
    of its prompt without the padding, and a padding position sees only itself (row 1's positions 16, 17
    see nothing in the first 16-key tile)."""
    lay = AttentionLayout(sharing, heads, kv_heads, D)
    cols = Columns.fused(lay)
    starts = torch.tensor([3, 18], dtype=torch.int64)
    src = torch.randn(2, 21, lay.rows, requires_grad=True)
    check(compare(cols, src, starts=starts), label=f"starts {sharing} {heads}/{kv_heads}")
    with torch.no_grad():
        out = triton_attention(src, None, cols, starts.int())
        v = roles(src, None, cols)[2].repeat_interleave(cols.q_per_group, 2)
        for row, first in enumerate(starts.tolist()):
            alone = triton_attention(src[row:row + 1, first:], None, cols)[0]
            assert (out[row, first:] - alone).abs().max().item() <= FP32_TOL
            assert (out[row, :first] - v[row, :first]).abs().max().item() <= FP32_TOL


def test_non_contiguous_sources():
    """A column slice of a wider tensor with transposed batch/seq strides (fused), and split sources sliced
    out of one [b, n, q + kv] tensor."""
    lay = AttentionLayout("kv", 4, 2, D)
    cols = Columns.fused(lay)
    big = torch.randn(19, 2, lay.rows + 24, requires_grad=True)
    src = big.transpose(0, 1)[..., 8:8 + lay.rows]
    assert src.stride(-1) == 1 and not src.is_contiguous()
    check(compare(cols, src, leaves=[big]), label="strided fused")
    cols = Columns.split(2, D, False)
    both = torch.randn(2, 19, 4 * D, requires_grad=True)
    check(compare(cols, both[..., :2 * D], both[..., 2 * D:], leaves=[both]), label="strided split")


def test_real_head_dims():
    """head_dim 64 and 128 (the training shapes), GQA and Q=K=V."""
    for sharing, heads, kv_heads, d in (("none", 4, 2, 64), ("qkv", 2, 2, 128)):
        lay = AttentionLayout(sharing, heads, kv_heads, d)
        src = torch.randn(2, 20, lay.rows, requires_grad=True)
        check(compare(Columns.fused(lay), src), label=f"{sharing} d={d}")


def test_reference_is_sensitive():
    """The comparison can fail: swapping the key and value columns, or dropping the causal mask, moves the
    reference far from the kernel."""
    lay = AttentionLayout("none", 4, 2, D)
    cols = Columns.fused(lay)
    src = torch.randn(2, 13, lay.rows)
    out = triton_attention(src, None, cols)
    swapped = Columns(cols.groups, cols.q_per_group, D, cols.q_base, cols.q_group_stride, cols.v_base, cols.k_base,
                      cols.kv_group_stride, True)
    assert (out - reference(src, None, cols)).abs().max().item() <= FP32_TOL
    assert (out - reference(src, None, swapped)).abs().max().item() > 0.1
    q, k, v = (t.transpose(1, 2) for t in roles(src, None, cols))
    full = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
    assert (out - full).abs().max().item() > 0.1


@pytest.mark.parametrize("d", [8, 24, 512])
def test_unsupported_head_dim(d):
    lay = AttentionLayout("none", 2, 2, d)
    with pytest.raises(ValueError, match="head_dim"):
        triton_attention(torch.randn(1, 4, lay.rows), None, Columns.fused(lay))


def test_columns_must_cover_the_sources():
    cols = Columns.split(2, D, True)
    with pytest.raises(ValueError, match="tile"):  # a kv_src with a second, unowned slot
        triton_attention(torch.randn(1, 4, 2 * D), torch.randn(1, 4, 2 * D), cols)
    with pytest.raises(ValueError, match="None"):
        triton_attention(torch.randn(1, 4, 2 * D), None, cols)


def _interpreter_computes(dtype) -> bool:
    """Whether Triton's interpreter does arithmetic in `dtype` (this one keeps bf16 as raw uint16 bits, so a
    bf16 tl.dot returns garbage), probed with the product the kernel relies on."""
    import triton
    import triton.language as tl

    @triton.jit
    def square(x_ptr, o_ptr):
        i = tl.arange(0, 16)
        x = tl.load(x_ptr + i[:, None] * 16 + i[None, :])
        tl.store(o_ptr + i[:, None] * 16 + i[None, :], tl.dot(x, x))

    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = torch.zeros(16, 16)
    try:
        square[(1,)](x, out)
    except Exception:  # noqa: BLE001 — any failure means no such arithmetic here
        return False
    return bool(((out - x.float() @ x.float()).abs() <= 1e-3).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_smoke(dtype):
    """Half inputs (fp32 accumulation): output and gradient in the input dtype, close to fp32 attention of
    the same rounded values."""
    if not _interpreter_computes(dtype):
        pytest.skip(f"this Triton interpreter cannot compute in {dtype}")
    lay = AttentionLayout("kv", 4, 2, D)
    cols = Columns.fused(lay)
    src = torch.randn(2, 23, lay.rows).to(dtype).requires_grad_()
    out = triton_attention(src, None, cols)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.float().backward(upstream)
    ref_src = src.detach().float().requires_grad_()
    want = reference(ref_src, None, cols)
    want.backward(upstream)
    assert out.dtype == src.grad.dtype == dtype
    diffs = {"out": (out.float() - want).abs().max().item(),
             "grad": (src.grad.float() - ref_src.grad).abs().max().item()}
    check(diffs, tol=2e-2 * max(1.0, ref_src.grad.abs().max().item()), label=str(dtype))
