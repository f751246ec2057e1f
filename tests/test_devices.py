"""Device decisions that must not fail late: accelerator detection, CPU processes that never touch CUDA, the
peak behind MFU (GPU datasheet names, the cached CPU calibration) and Megatron's FLOP convention beside ours.

CUDA is absent here, so "a GPU machine" is torch.cuda.is_available patched to True with every torch.cuda call
that would open a context patched to raise: that tests our decision, not CUDA."""
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megaqkv import analysis
from megaqkv.config import Config, LoggingConfig, TrainingConfig, load_model_config
from megaqkv.kernels import attention as katt, detect, norm as knorm
from megaqkv.parallel import grid, random as prandom
from megaqkv.training import checkpointing, monitor

from conftest import MODEL_CONFIGS, REPO

CUDA_CALLS = ("_lazy_init", "get_rng_state", "set_rng_state", "max_memory_allocated", "get_device_name",
              "current_device", "set_device", "get_device_capability")
PATCH_CUDA = f"""
import torch
torch.cuda.is_available = lambda: True
def _refuse(name):
    def call(*args, **kwargs):
        raise AssertionError(f"torch.cuda.{{name}} called in a CPU process")
    return call
for _name in {CUDA_CALLS!r}:
    setattr(torch.cuda, _name, _refuse(_name))
"""


@pytest.fixture
def gpu_machine(monkeypatch):
    """PATCH_CUDA in this process, undone after the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in CUDA_CALLS:
        monkeypatch.setattr(torch.cuda, name, _refuse(name))
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


def _refuse(name):
    def call(*args, **kwargs):
        raise AssertionError(f"torch.cuda.{name} called in a CPU process")
    return call


@pytest.fixture
def gloo_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ---- B: who uses CUDA ----

def test_uses_cuda_without_a_process_group(gpu_machine, monkeypatch):
    assert grid.uses_cuda()  # single-process evaluation / generation on a GPU machine
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not grid.uses_cuda()
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not grid.uses_cuda()


def test_gloo_process_on_a_gpu_machine_never_touches_cuda(gpu_machine, gloo_group, monkeypatch, tmp_path):
    assert not grid.uses_cuda() and grid.comm_device() == torch.device("cpu")
    tracker = prandom.RNGTracker()
    tracker.seed(3)
    with tracker.fork():
        torch.rand(2)
    assert set(tracker.get_state()) == {"cpu"}
    state = checkpointing.rng_state(tracker)
    assert "cuda" not in state
    checkpointing.set_rng_state({**state, "cuda": torch.zeros(8, dtype=torch.uint8)}, tracker)  # saved by a GPU run
    tracker.set_state({"cpu": torch.get_rng_state(), "cuda": torch.zeros(8, dtype=torch.uint8)})
    with tracker.fork():
        torch.rand(2)
    assert monitor.memory_gib() > 0  # the process's RSS, not CUDA's allocator
    # each run of an ablation reports its own peak: a freed 512 MiB no longer counts after the reset
    monitor.reset_peak_memory()
    big = torch.ones(2 ** 27)
    del big
    before = monitor.memory_gib()
    monitor.reset_peak_memory()
    assert before - monitor.memory_gib() > 0.4
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(monitor, "measure_cpu_peak_tflops", lambda dtype: 0.5)
    cfg = Config(model=load_model_config(MODEL_CONFIGS / "tiny_kv.yaml"))
    assert monitor.device_peak_tflops(cfg)[0] == 0.5


def test_nccl_process_keeps_the_cuda_stream(gloo_group, monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.arange(4, dtype=torch.uint8))
    applied = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", applied.append)
    assert grid.uses_cuda()
    states = prandom._get_states()
    assert torch.equal(states["cuda"], torch.arange(4, dtype=torch.uint8))
    prandom._set_states(states)
    assert len(applied) == 1


def test_offline_deepspeed_writer_never_touches_cuda(tmp_path):
    """The worker of megaqkv.training.materialize (tools/convert_ckpt.py --to deepspeed), the whole of it:
    DeepSpeed engine, loading the weights and Adam state, seeding, saving, on a "GPU machine"."""
    script = PATCH_CUDA + textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from dist_worker import random_consolidated
        from megaqkv.checkpoint import consolidated
        from megaqkv.parallel.grid import free_port
        from megaqkv.training import materialize

        src = consolidated.save(random_consolidated("qmqa"), {str(tmp_path / "ck")!r})
        materialize._worker(0, 1, free_port(), str(src), {str(tmp_path / "ds")!r}, 1, 1, "bf16")
    """)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    run = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "ds" / "latest").read_text().strip() == "global_step7"


# ---- A: accelerator detection ----

def test_apex_counts_only_with_its_cuda_extension(monkeypatch):
    fused = object()
    present = {("apex.normalization.fused_layer_norm", "fused_layer_norm_affine"): fused}
    monkeypatch.setattr(detect, "optional", lambda module, attr: present.get((module, attr)))
    assert detect.apex_layer_norm() is None  # Python-only apex: would fail inside the first forward
    present[("fused_layer_norm_cuda", "forward_affine")] = object()
    assert detect.apex_layer_norm() is fused


def test_flash_version_by_device_and_dropout(monkeypatch):
    fa2, fa3, capability = object(), object(), [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(detect, "flash_attn_func", lambda: fa2)
    monkeypatch.setattr(detect, "flash3_attn_func", lambda: fa3)
    gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert detect.flash_version(gpu, 0.0) == 3  # Hopper
    assert detect.flash_version(gpu, 0.1) == 2  # FA3 has no attention dropout
    assert detect.flash_version(torch.empty(1), 0.0) == 2  # not CUDA: capability never asked
    capability[0] = (8, 0)
    assert detect.flash_version(gpu, 0.0) == 2  # Ampere
    capability[0] = (9, 0)
    monkeypatch.setattr(detect, "flash3_attn_func", lambda: None)
    assert detect.flash_version(gpu, 0.0) == 2
    monkeypatch.setattr(detect, "flash_attn_func", lambda: None)
    assert detect.flash_version(gpu, 0.0) is None


@pytest.fixture
def fake_gpu_kernels(monkeypatch):
    """This CPU as a Hopper GPU with FlashAttention-3 (returning (out, lse) like some releases) and apex."""
    calls = []

    def fa3(q, k, v, causal=False):
        calls.append(causal)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            enable_gqa=True).transpose(1, 2)
        return out, torch.zeros(1)

    monkeypatch.setattr(detect, "on_accelerator", lambda t: True)
    monkeypatch.setattr(knorm, "on_accelerator", lambda t: True)
    monkeypatch.setattr(knorm, "apex_layer_norm", lambda: object())
    for module in (detect, katt):
        monkeypatch.setattr(module, "flash_version", lambda t, dropout_p: 3 if dropout_p == 0 else 2)
    monkeypatch.setattr(katt, "flash3_attn_func", lambda: fa3)
    monkeypatch.setitem(katt.AUTO, "cpu", ("flash", "sdpa"))
    return calls


def test_flash3_call_and_the_kernel_description(fake_gpu_kernels):
    from megaqkv.kernels.columns import Columns
    from megaqkv.variants import AttentionLayout

    cols = Columns.fused(AttentionLayout("kv", 16, 2, 32))  # Q-GQA-2
    fused = torch.randn(2, 6, 2 * 9 * 32, dtype=torch.bfloat16)  # 576 columns: flash limits the head dim (32)
    ours = katt.causal_attention(fused, None, cols, backend="auto")
    ref = katt.causal_attention(fused, None, cols, backend="sdpa")
    assert fake_gpu_kernels == [True] and torch.equal(ours, ref)  # the tensor, not (out, lse)
    cfg = load_model_config(MODEL_CONFIGS / "300M_qmqa.yaml")  # projection 1152 wide, heads of 64
    like = torch.empty(0, dtype=torch.bfloat16)
    text = katt.kernels_text(cfg.attention_backend, like, Columns.fused(AttentionLayout.of(cfg)), cfg.attention_dropout)
    assert text == ("attention kernels: training and prefill flash-3 (attention_backend: "
                                                 "auto on cpu), decoding torch; LayerNorm: apex fused")


def test_kernel_description_here():
    from megaqkv.kernels.columns import Columns
    from megaqkv.variants import AttentionLayout

    cfg = load_model_config(MODEL_CONFIGS / "300M_qkv.yaml")
    text = katt.kernels_text(cfg.attention_backend, torch.empty(0), Columns.fused(AttentionLayout.of(cfg)),
                             cfg.attention_dropout)
    assert text == (
        "attention kernels: training and prefill sdpa (attention_backend: auto on cpu), decoding torch; "
        "LayerNorm: torch")


# ---- C: the peak ----

@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA H20", 148.0),
    ("NVIDIA L4", 121.0), ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", 70.0), ("NVIDIA RTX A6000", 154.8), ("NVIDIA GeForce RTX 4090", 165.2),
    ("Tesla V100-SXM2-16GB", 125.0), ("Tesla V100-PCIE-32GB", 112.0), ("AMD Instinct MI300X", 1307.4),
    ("NVIDIA RTX A1000 Laptop GPU", None), ("NVIDIA GeForce GTX 1080", None)])  # A1000 is no A10
def test_gpu_datasheet_names(name, peak):
    assert monitor.gpu_peak_tflops(name) == peak


def test_cpu_calibration_is_cached_and_a_corrupt_cache_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []
    monkeypatch.setattr(monitor, "measure_cpu_peak_tflops", lambda dtype: measured.append(dtype) or 1.25)
    peak, source = monitor.cpu_peak_tflops(torch.bfloat16)
    assert (peak, measured) == (1.25, [torch.bfloat16]) and source.startswith("CPU calibration measured now")
    path = tmp_path / "megaqkv" / "cpu_peak.json"
    assert os.listdir(path.parent) == ["cpu_peak.json"]  # written atomically: no temporary left behind

    def refuse(dtype):
        raise AssertionError("measured although cached")

    monkeypatch.setattr(monitor, "measure_cpu_peak_tflops", refuse)
    peak, source = monitor.cpu_peak_tflops(torch.bfloat16)
    assert peak == 1.25 and source.startswith(f"CPU calibration cached in {path}")
    monkeypatch.setattr(monitor, "measure_cpu_peak_tflops", lambda dtype: measured.append(dtype) or 0.125)
    assert monitor.cpu_peak_tflops(torch.float32)[0] == 0.125  # another dtype: its own entry
    assert len(json.loads(path.read_text())) == 2

    for damage in ('{"truncated', '[1, 2]', json.dumps({k: {"tflops": -1} for k in json.loads(path.read_text())})):
        path.write_text(damage)
        with pytest.warns(UserWarning, match="unreadable CPU peak cache"):
            assert monitor.cpu_peak_tflops(torch.float32)[0] == 0.125
        assert json.loads(path.read_text())  # rewritten whole


def test_configured_peak_wins(monkeypatch):
    monkeypatch.setattr(monitor, "measure_cpu_peak_tflops", lambda dtype: pytest.fail("measured"))
    cfg = Config(model=load_model_config(MODEL_CONFIGS / "tiny_kv.yaml"), logging=LoggingConfig(peak_tflops=2.0))
    assert monitor.device_peak_tflops(cfg) == (2.0, "logging.peak_tflops")


# ---- D: Megatron's FLOP convention ----

def megatron_2024(args, batch_size):
    """Megatron-LM's num_floating_point_operations as of 2024 (dense GPT terms), written from its source."""
    query_projection_to_hidden_size_ratio = args.kv_channels * args.num_attention_heads / args.hidden_size
    return (12 * batch_size * args.seq_length * args.num_layers * args.hidden_size * args.hidden_size * (
        (1 + args.num_query_groups / args.num_attention_heads + args.seq_length / args.hidden_size)
        * query_projection_to_hidden_size_ratio
        + args.ffn_hidden_size / args.hidden_size
        + args.padded_vocab_size / (2 * args.num_layers * args.hidden_size)))


def megatron_2025(args, batch_size):
    """Its 2025 form: per-projection terms and the causal half of the core attention."""
    q, kv = args.kv_channels * args.num_attention_heads, args.kv_channels * args.num_query_groups
    attn = 3 * 2 * (args.hidden_size * (q + 2 * kv) + q * args.seq_length / 2 * 2 + q * args.hidden_size)
    mlp = 3 * 2 * args.hidden_size * args.ffn_hidden_size * 2
    return batch_size * args.seq_length * (args.num_layers * (attn + mlp) + 3 * 2 * args.hidden_size
                                           * args.padded_vocab_size)


@pytest.mark.parametrize("preset", ["qkv", "kv", "gqa4", "qmqa", "k"])
def test_megatron_count_of_300m(preset):
    cfg = load_model_config(MODEL_CONFIGS / f"300M_{preset}.yaml")
    t = 2048
    args = SimpleNamespace(seq_length=t, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                           num_attention_heads=cfg.num_heads, kv_channels=cfg.head_dim, num_query_groups=cfg.kv_heads,
                           ffn_hidden_size=cfg.ffn_hidden_size, padded_vocab_size=cfg.vocab_size)
    assert analysis.megatron_flops_per_token(cfg, t) == pytest.approx(megatron_2024(args, 8) / (8 * t), rel=1e-12)
    assert analysis.megatron_flops_per_token(cfg, t, causal=True) == pytest.approx(megatron_2025(args, 8) / (8 * t),
                                                                                   rel=1e-12)
    # ours counts the causal triangle (and, for shared projections, only the rows the variant has)
    assert analysis.training_flops_per_token(cfg, t) < analysis.megatron_flops_per_token(cfg, t)


def test_megatron_count_by_hand():
    qkv = load_model_config(MODEL_CONFIGS / "300M_qkv.yaml")  # L 20, h 1024, 16 heads, F 4096, V 50304
    assert analysis.megatron_flops_per_token(qkv, 2048) == 12 * 20 * 1024 ** 2 * (4 + 4) + 6 * 1024 * 50304
    qmqa = load_model_config(MODEL_CONFIGS / "300M_qmqa.yaml")  # one KV head: counted as MQA, K and V apart
    assert analysis.megatron_flops_per_token(qmqa, 2048) == 12 * 20 * 1024 ** 2 * (3 + 1 / 16 + 4) + 6 * 1024 * 50304


def test_monitor_records_and_prints_both_conventions(monkeypatch):
    cfg = Config(model=load_model_config(MODEL_CONFIGS / "tiny_kv.yaml"),
                 training=TrainingConfig(micro_batch_size=2, global_batch_size=2, seq_length=64),
                 logging=LoggingConfig(interval=1, peak_tflops=1.0))
    lines = []
    mon = monitor.Monitor(cfg, world_size=1, is_writer=True, total_steps=2, log=lines.append)
    rec = mon.step(1, 128, 5.0, 1e-4, 1.0, 0, 0.5)
    ours, megatron = mon.flops_per_token, mon.megatron_flops_per_token
    assert ours < megatron
    assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * ours / 1e12)
    assert rec["mfu_megatron"] == pytest.approx(rec["tokens_per_s"] * megatron / 1e12)
    assert "Megatron's: " in lines[0] and "(logging.peak_tflops)" in lines[0]
    assert f"MFU {100 * rec['mfu']:.1f}% (Megatron {100 * rec['mfu_megatron']:.1f}%) | mem " in lines[1]


def test_unwritable_cpu_peak_cache_costs_only_a_warning(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # its "megaqkv" directory cannot be made
    monkeypatch.setattr(monitor, "measure_cpu_peak_tflops", lambda dtype: 0.75)
    with pytest.warns(UserWarning, match="cannot cache the CPU peak"):
        assert monitor.cpu_peak_tflops(torch.float32)[0] == 0.75
