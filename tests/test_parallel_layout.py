"""Single-process checks of the parallel layout: sharding maps, per-rank counts, batch and config errors."""
import dataclasses

import pytest
import torch

from megaqkv.analysis import main as analyze_main, per_rank_parameters
from megaqkv.config import Config, ConfigError, TrainingConfig, load_config, load_model_config
from megaqkv.model import GPT
from megaqkv.model.pipeline import layer_costs, stage_bounds
from megaqkv.parallel.grid import TPGroup
from megaqkv.parallel.layers import padded_vocab_size
from megaqkv.parallel.sharding import canonical_from_shards, canonical_shapes, shard_from_canonical
from megaqkv.training.engine import derive_batch, deepspeed_config, read_ds_config
from megaqkv.variants import PRESETS

from conftest import MODEL_CONFIGS


def valid_tp(cfg):
    n, g = cfg.num_heads, cfg.kv_heads
    return [t for t in (1, 2, 4, 8) if n % t == 0 and (g % t == 0 or t % g == 0)]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_shard_and_merge_round_trip(preset):
    """canonical -> every rank's shard (shapes as the TP module builds them) -> canonical, bit for bit."""
    cfg = dataclasses.replace(load_model_config(MODEL_CONFIGS / f"tiny_{preset}.yaml"), vocab_size=1000)
    shapes = canonical_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    canonical = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for tp in valid_tp(cfg):
        with torch.device("meta"):
            local = dict(GPT(cfg, tp=TPGroup(size=tp, rank=0)).named_parameters())
        merged = {}
        for name, param in local.items():
            shards = [shard_from_canonical(name, canonical.__getitem__, cfg, tp, r) for r in range(tp)]
            assert all(s.shape == param.shape for s in shards), (name, tp)
            merged.update(canonical_from_shards(name, shards, cfg))
        assert merged.keys() == canonical.keys()
        assert all(torch.equal(merged[k], canonical[k]) for k in canonical), tp


def test_vocab_padding_sizes():
    assert [padded_vocab_size(50304, t) for t in (1, 2, 4, 8)] == [50304, 50432, 50688, 51200]
    assert padded_vocab_size(1000, 2) == 1024


def test_per_rank_counts_1_2b():
    qmqa = load_model_config(MODEL_CONFIGS / "1.2B_qmqa.yaml")
    qkv = load_model_config(MODEL_CONFIGS / "1.2B_qkv.yaml")
    for tp in (2, 8):
        r = per_rank_parameters(qmqa, tp)
        # Q-MQA: K=V, so there are no V rows anywhere; the single shared KV head is replicated
        assert r["attention_rows_per_rank"] == {"q": 2048 // tp, "kv (replicated)": 64}
        assert r["replicated_kv"] == 22 * (64 * 2048 + 64)
        assert r["duplicated"] == (tp - 1) * (r["replicated_kv"] + r["replicated_other"])
        base = per_rank_parameters(qkv, tp)
        assert base["attention_rows_per_rank"] == {"q": 2048 // tp, "k": 2048 // tp, "v": 2048 // tp}
        assert base["replicated_kv"] == 0 and base["duplicated"] == (tp - 1) * base["replicated_other"]
    assert per_rank_parameters(qmqa, 8)["per_rank"] == 135_832_448
    assert per_rank_parameters(qkv, 8)["per_rank"] == 156_027_392


def test_analyze_per_rank_cli(capsys):
    assert analyze_main([str(MODEL_CONFIGS / "300M_mqa.yaml"), "--tp", "2"]) == 0
    assert "k (replicated):64 v (replicated):64" in capsys.readouterr().out
    assert analyze_main([str(MODEL_CONFIGS / "300M_gqa4.yaml"), "--tp", "3"]) == 2
    assert "--tp 3: tensor parallel size 3 must divide num_heads=16" in capsys.readouterr().err


def cfg_with(tmp_path, **parallel):
    run = tmp_path / "run.yaml"
    run.write_text("parallel:\n" + "".join(f"  {k}: {v}\n" for k, v in parallel.items()))
    return run


@pytest.mark.parametrize("preset, parallel, words", [
    ("300M_qkv", {"tp": 3}, "tensor parallel size 3 must divide num_heads=16"),
    ("300M_gqa4", {"tp": 8}, None),  # 8 is a multiple of 4: KV heads replicated
    ("1.2B_qgqa8", {"tp": 16}, None),
    ("300M_mqa", {"tp": 16}, None),
    ("tiny_qkv", {"pp": 3}, "pipeline size 3 exceeds num_layers=2"),
    ("300M_qkv", {"tp": 16}, None),
    ("tiny_qkv", {"tp": 0}, "must be at least 1"),
    ("300M_qmqa", {"sp": 4}, None),  # one KV head: each SP rank gets a copy
    ("300M_gqa4", {"sp": 4, "tp": 2}, None),  # 2 KV heads per TP rank, SP a multiple of them
    ("300M_qkv", {"sp": 3}, r"sequence parallel size 3 must divide the 16 query heads of each TP rank \(num_heads=16 / "
                            r"tp=1\); use one of \[1, 2, 4, 8, 16\]"),
    ("300M_qkv", {"sp": 16, "tp": 2}, "must divide the 8 query heads of each TP rank"),
    ("1.2B_gqa8", {"sp": 2, "tp": 2}, None),
    ("tiny_qkv", {"sp": 0}, "must be at least 1"),
])
def test_parallel_validation(tmp_path, preset, parallel, words):
    model, run = MODEL_CONFIGS / f"{preset}.yaml", cfg_with(tmp_path, **parallel)
    if words is None:
        load_config(model, run)
        return
    with pytest.raises(ConfigError, match=f"^{run}: parallel.(tp|pp|sp): .*{words}"):
        load_config(model, run)


def test_tp_must_divide_the_mlp(tmp_path):
    with pytest.raises(ConfigError, match="parallel.tp: tensor parallel size 2 must divide model.ffn_hidden_size=101"):
        load_config(MODEL_CONFIGS / "tiny_kv.yaml", overrides=["parallel.tp=2", "model.ffn_hidden_size=101"])


def test_tp_neither_multiple_nor_divisor_of_kv_heads(tmp_path):
    model = tmp_path / "m.yaml"
    model.write_text("num_layers: 2\nhidden_size: 96\nnum_heads: 12\nffn_hidden_size: 8\nnum_kv_heads: 4\n")
    with pytest.raises(ConfigError, match=r"parallel.tp: tensor parallel size 6 must divide num_kv_heads=4 or be a "
                                          r"multiple of it .* use one of \[1, 2, 4, 12\]"):
        load_config(model, overrides=["parallel.tp=6"])


def test_sp_must_fit_kv_heads_and_sequence(tmp_path):
    model = tmp_path / "m.yaml"
    model.write_text("num_layers: 2\nhidden_size: 96\nnum_heads: 12\nffn_hidden_size: 8\nnum_kv_heads: 4\n"
                     "max_position_embeddings: 128\n")
    with pytest.raises(ConfigError, match=r"parallel.sp: sequence parallel size 3 must divide the 4 KV heads of each TP "
                                          r"rank or be a multiple of them .* use one of \[1, 2, 4, 12\]"):
        load_config(model, overrides=["parallel.sp=3"])
    with pytest.raises(ConfigError, match=r"training.seq_length: 102 is not divisible by parallel.sp=4: each "
                                          r"sequence-parallel rank holds an equal slice; use 100 or 104"):
        load_config(model, overrides=["parallel.sp=4", "training.seq_length=102"])
    cfg = load_config(model, overrides=["parallel.sp=2", "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"parallel.tp=2 × parallel.sp=2 × parallel.pp=1 = 4 does not divide the 6 "
                                          r"launched processes; launch a multiple of 4 processes or change tp/sp/pp"):
        cfg.parallel.data_parallel_size(6)
    assert cfg.parallel.data_parallel_size(8) == 2


def test_run_config_errors(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  num_layers: 3\n")
    with pytest.raises(ConfigError, match="model settings belong in the model config"):
        load_config(MODEL_CONFIGS / "tiny_kv.yaml", run)
    run.write_text("training:\n  seq_length: 4096\n")
    with pytest.raises(ConfigError, match=f"^{run}: training.seq_length: 4096 exceeds model.max_position"):
        load_config(MODEL_CONFIGS / "tiny_kv.yaml", run)
    cfg = load_config(MODEL_CONFIGS / "tiny_kv.yaml")
    assert cfg.training.seq_length == 256  # defaults to the model's positions


def test_batch_derivation():
    t = TrainingConfig(micro_batch_size=4, global_batch_size=64)
    assert derive_batch(t, 2).gradient_accumulation_steps == 8
    assert derive_batch(TrainingConfig(micro_batch_size=2, gradient_accumulation_steps=3), 4).global_batch_size == 24
    with pytest.raises(ConfigError, match="global_batch_size=60 is not a multiple of .* = 8; use a global batch of 56 or 64"):
        derive_batch(TrainingConfig(micro_batch_size=4, global_batch_size=60), 2)
    with pytest.raises(ConfigError, match="disagrees with .* × data-parallel size 2 = 48; set only two of the three"):
        derive_batch(TrainingConfig(micro_batch_size=4, gradient_accumulation_steps=6, global_batch_size=64), 2)


def test_deepspeed_config(tmp_path):
    cfg = Config(model=load_model_config(MODEL_CONFIGS / "tiny_kv.yaml"),
                 training=TrainingConfig(micro_batch_size=2, global_batch_size=8, grad_clip=0.5))
    batch = derive_batch(cfg.training, 2)
    base, source = read_ds_config(None)
    ds = deepspeed_config(cfg, batch, base, source)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = deepspeed_config(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, precision="fp32")),
                            batch, base, source)
    assert not fp32["bf16"]["enabled"] and "data_types" not in fp32
    for bad, words in (({"train_batch_size": 16}, "train_batch_size=16 disagrees"),
                       ({"optimizer": {"type": "Adam"}}, "'optimizer'/'scheduler' are set by megaqkv"),
                       ({"zero_optimization": {"stage": 2}}, "supports ZeRO stages 0 and 1 only")):
        with pytest.raises(ConfigError, match=words):
            deepspeed_config(cfg, batch, bad, "my_ds.json")
    sp2 = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sp=2))  # the user's global batch holds
    ds = deepspeed_config(sp2, batch, {**base, "train_batch_size": 8}, source)  # DeepSpeed counts SP ranks as data
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 2)
    broken = tmp_path / "ds.json"
    broken.write_text("{stage: 1")
    with pytest.raises(ConfigError, match=f"{broken}: not valid JSON"):
        read_ds_config(broken)
    with pytest.raises(ConfigError, match="DeepSpeed config not found"):
        read_ds_config(tmp_path / "missing.json")


@pytest.mark.parametrize("scale, pp, blocks", [
    ("300M", 2, [12, 8]),  # the head and loss weigh about 3.5 blocks: the last stage gets fewer
    ("300M", 4, [6, 6, 6, 2]),
    ("tiny", 2, [1, 1]),  # the head outweighs both blocks; still a block on each stage, never the head alone
    ("tiny", 1, [2]),
])
def test_pipeline_stages_balance_compute_and_each_holds_a_block(scale, pp, blocks):
    cfg = load_model_config(MODEL_CONFIGS / f"{scale}_kv.yaml")
    costs = layer_costs(cfg, cfg.max_position_embeddings)
    bounds = stage_bounds(costs, cfg.num_layers, pp)
    assert bounds[0] == 0 and bounds[-1] == len(costs) == cfg.num_layers + 4
    assert [min(hi, 2 + cfg.num_layers) - max(lo, 2) for lo, hi in zip(bounds, bounds[1:])] == blocks
