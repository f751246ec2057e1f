"""The PyTorch halves of the attention kernels: the fused-gradient split and the blocked cache attention.

The Triton kernels have their own interpreter tests (test_triton_attention.py, test_triton_decode.py);
the model-level comparison of the Triton backend with SDPA is at the end of this file.
"""

import pytest
import torch

from megaqkv.kernels import decode as kdecode
from megaqkv.kernels.columns import Columns
from megaqkv.kernels.decode import blocked_attention
from megaqkv.kernels.roles import split_roles
from megaqkv.variants import PRESETS, AttentionLayout

from test_generation import tiny


def layouts():
    """Every preset at 8 heads (TP=1), and the TP=2 local shapes."""
    for preset, (sharing, g) in PRESETS.items():
        g = min(g or 8, 8)
        yield preset, AttentionLayout(sharing, 8, g, 16)
        if g % 2 == 0:
            yield preset + "@tp2", AttentionLayout(sharing, 4, g // 2, 16)


def slice_reference(src, lay):
    """q, k, v by plain indexing (autograd's slice backward), the independent reference."""
    blocks = src.view(*src.shape[:2], lay.num_kv_heads, lay.slots_per_group, lay.head_dim)
    q = (blocks[:, :, :, lay.k_slot] if lay.sharing in ("qk", "qkv")
         else blocks[:, :, :, :lay.q_per_group].flatten(2, 3))
    return q, blocks[:, :, :, lay.k_slot], blocks[:, :, :, lay.v_slot]


@pytest.mark.parametrize("name,lay", list(layouts()), ids=lambda x: x if isinstance(x, str) else "")
def test_split_roles_writes_the_fused_gradient(name, lay):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 5, lay.rows, generator=g, requires_grad=True)
    ours = split_roles(src, None, Columns.fused(lay))
    ref = slice_reference(src, lay)
    assert (ours[2] is ours[1]) == lay.kv_shared and (ours[0] is ours[1]) == (lay.sharing in ("qk", "qkv"))
    ups = [torch.randn(t.shape, generator=g) for t in ours]
    got = torch.autograd.grad(sum((t * u).sum() for t, u in zip(ours, ups)), src)[0]
    want = torch.autograd.grad(sum((t * u).sum() for t, u in zip(ref, ups)), src)[0]
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert torch.allclose(got, want, atol=1e-6) and got.abs().min() > 0  # every column written


@pytest.mark.parametrize("kv_shared", [False, True])
def test_split_roles_of_separate_query_and_kv_rows(kv_shared):
    q_src = torch.randn(2, 5, 4 * 16, requires_grad=True)
    kv_src = torch.randn(2, 5, (1 if kv_shared else 2) * 16, requires_grad=True)
    q, k, v = split_roles(q_src, kv_src, Columns.split(4, 16, kv_shared))
    assert q.shape == (2, 5, 4, 16) and k.shape == (2, 5, 1, 16) and (k is v) == kv_shared
    (q.sum() + 2 * k.sum() + 3 * v.sum()).backward()
    assert torch.equal(q_src.grad, torch.ones_like(q_src))
    expected = [torch.full((16,), 5.0)] if kv_shared else [torch.full((16,), 2.0), torch.full((16,), 3.0)]
    assert torch.equal(kv_src.grad, torch.cat(expected).expand(2, 5, -1))


def masked_reference(q, keys, values, valid, start):
    b, n, heads, d = q.shape
    g = keys.shape[1]
    length = start + n
    k = keys[:, :, :length].repeat_interleave(heads // g, 1).double()
    v = values[:, :, :length].repeat_interleave(heads // g, 1).double()
    scores = q.transpose(1, 2).double() @ k.transpose(-1, -2) * d ** -0.5
    slot, query = torch.arange(length), torch.arange(start, length)[:, None]
    seen = (slot <= query) & (valid[:, None, :length] | (slot == query))
    out = scores.masked_fill(~seen[:, None], float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2)


@pytest.mark.parametrize("groups,shared", [(8, False), (8, True), (2, False), (1, True)])
@pytest.mark.parametrize("new", [1, 3])
def test_blocked_attention_equals_masked_softmax(groups, shared, new):
    g = torch.Generator().manual_seed(groups + new)
    b, heads, d, max_len, start = 3, 8, 16, 64, 37
    keys = torch.randn(b, groups, max_len, d, generator=g)
    values = keys if shared else torch.randn(b, groups, max_len, d, generator=g)
    keys[:, :, start + new:] = float("nan")  # slots past the cached length are never read into the result
    valid = torch.ones(b, max_len, dtype=torch.bool)
    valid[1, :11] = False  # left padding
    valid[2, :start] = False  # only its own new tokens are visible
    valid[0, 20] = False  # a finished sequence's hole
    q = torch.randn(b, new, heads, d, generator=g)
    want = masked_reference(q, keys, values, valid, start)
    for block in (5, 16, 64):  # several blocks, a first block nothing sees (row 2), one block
        got = blocked_attention(q, keys, values, valid, start, block=block)
        assert (got.double() - want).abs().max() < 1e-5, block


def test_decode_uses_the_torch_path_on_cpu():
    assert kdecode.decode_backend(torch.zeros(1), 1) == "torch"




def small(preset, backend="sdpa"):
    """A 1-layer model at 8 heads of 16 (the Triton kernels need head_dim >= 16), fp32, weights off the init."""
    g = PRESETS[preset][1]
    return tiny(preset, num_layers=1, num_heads=8, num_kv_heads=None if g is None else min(g, 8),
                attention_backend=backend).train()


@pytest.mark.parametrize("backend", ["triton", "math"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_backend_equals_sdpa_in_the_model(preset, backend):
    """Loss, logits and every gradient (the fused in_proj's included) of the Triton backend, and of SDPA's
    reference kernel (`math`, gpu_check's baseline), equal SDPA's, at a sequence length that is not a multiple
    of any tile."""
    if backend == "triton":
        pytest.importorskip("triton")
    tokens = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(2))
    runs = []
    for backend in ("sdpa", backend):
        model = small(preset, backend)
        out = model(tokens, labels=tokens, logits=True)
        out.loss.backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = runs
    logits = (got.logits - ref.logits).abs().max().item()
    assert ref_grads["layers.0.attn.in_proj.weight"].abs().max() > 1e-3
    worst = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    print(f"{preset}: max |Δlogits| {logits:.1e}, |Δloss| {abs(got.loss.item() - ref.loss.item()):.1e}, "
          f"max |Δgrad| {worst:.1e}")
    assert logits <= 1e-5 and abs(got.loss.item() - ref.loss.item()) <= 1e-5 and worst <= 1e-5


@pytest.mark.parametrize("preset", list(PRESETS))
def test_triton_decode_equals_the_full_forward(preset, monkeypatch):
    """Prefill of a left-padded batch through the Triton training kernel, then Triton flash-decoding one token
    at a time: every real position's logits equal the full forward of that sequence alone."""
    pytest.importorskip("triton")
    from megaqkv.model.kv_cache import KVCache

    monkeypatch.setattr(kdecode, "decode_backend", lambda t, n: "triton" if n == 1 else "torch")
    model = small(preset, "triton").eval()
    seqs = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(3))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :6] = False  # row 1: a 4-token prompt left-padded to 10
    with torch.no_grad():
        cache = KVCache(model.cfg, 2, 24, torch.float32)
        parts = [model(seqs[:, :10], cache=cache, valid=valid[:, :10]).logits]
        parts += [model(seqs[:, t:t + 1], cache=cache).logits for t in range(10, 20)]
        cached = torch.cat(parts, 1)
        worst = max((cached[row, valid[row]] - model(seqs[row:row + 1, valid[row]]).logits[0]).abs().max().item()
                    for row in range(2))
    print(f"{preset}: max |Δlogits| of cached decoding {worst:.1e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("dtype,chosen", [(torch.float16, "triton"), (torch.bfloat16, "sdpa")])
def test_auto_takes_triton_only_where_its_self_test_passes(dtype, chosen, monkeypatch):
    """`auto` runs the kernel against SDPA once per variant before using it. Triton's interpreter computes fp16
    right and bf16 wrong (it multiplies bf16 bit patterns), so here fp16 passes and bf16 falls back with a
    warning — as a GPU whose Triton cannot compile the kernel would."""
    pytest.importorskip("triton")
    from megaqkv.kernels import attention as katt, detect

    monkeypatch.setitem(katt.AUTO, "cpu", ("triton", "sdpa"))  # as if this CPU were a GPU
    monkeypatch.setattr(detect, "_SELF_TESTS", {})
    cols = Columns.fused(AttentionLayout("kv", 4, 2, 16))
    src = torch.zeros(1, 4, 2 * 3 * 16, dtype=dtype)
    if chosen == "sdpa":
        with pytest.warns(UserWarning, match="Triton attention kernel self-test"):
            assert katt.choose_backend("auto", src, 16, 0.0, cols) == "sdpa"
    else:
        with torch.no_grad():  # the first call may come from an evaluation: the self-test takes gradients anyway
            assert katt.choose_backend("auto", src, 16, 0.0, cols) == "triton"
    assert katt.choose_backend("auto", src, 16, 0.0, cols) == chosen
    assert len(detect._SELF_TESTS) == 1  # decided once per variant, not per call


def test_a_run_names_and_warms_up_the_kernel_layout_it_uses_under_sp():
    """Under sequence parallelism the kernel reads the exchanged layout, not the projection's: that is the one a
    run must self-test and print before training, or the self-test first runs inside a checkpointed forward."""
    from megaqkv.model.attention import Attention
    from megaqkv.parallel.grid import SPGroup

    cfg = tiny("qmqa", num_heads=8, num_kv_heads=1).cfg
    assert Attention(cfg).kernel_cols == Attention(cfg).cols
    under_sp = Attention(cfg, sp=SPGroup(size=2, rank=0))
    assert under_sp.kernel_cols == Columns.fused(AttentionLayout("kv", 4, 1, cfg.head_dim)) != under_sp.cols


@pytest.mark.parametrize("dtype,passes", [(torch.float16, True), (torch.bfloat16, False)])
def test_decode_takes_triton_only_where_its_self_test_passes(dtype, passes, monkeypatch):
    pytest.importorskip("triton")
    from megaqkv.kernels import detect

    monkeypatch.setattr(kdecode, "decode_backend", lambda t, n: "triton")  # as if on CUDA
    monkeypatch.setattr(detect, "_SELF_TESTS", {})
    keys = torch.randn(2, 2, 40, 16).to(dtype)
    valid = torch.ones(2, 40, dtype=torch.bool)
    q = torch.randn(2, 1, 4, 16).to(dtype)
    if passes:
        out = kdecode.cached_attention(q, keys, keys, valid, 30)
    else:
        with pytest.warns(UserWarning, match="Triton decode kernel self-test"):
            out = kdecode.cached_attention(q, keys, keys, valid, 30)
    assert list(detect._SELF_TESTS.values()) == [passes]
    assert (out.float() - blocked_attention(q, keys, keys, valid, 30).float()).abs().max() < 1e-2
