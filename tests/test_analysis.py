"""Parameter counts, FLOPs and KV-cache bytes against DESIGN §2 and the paper's published numbers."""
import dataclasses
import json

import pytest
import torch

from megaqkv.analysis import forward_macs, main, sequence_exchange
from megaqkv.config import load_model_config
from megaqkv.model import GPT
from megaqkv.variants import PRESETS, attention_parameters, kv_cache_bytes_per_token, total_parameters

from conftest import MODEL_CONFIGS

# DESIGN §2: the numbers the paper's models have.
DESIGN_COUNTS = {
    "300M": {"qkv": 305_534_976, "qk": 284_542_976, "kv": 284_542_976, "k": 263_550_976, "gqa4": 274_046_976,
             "mqa": 266_174_976, "qgqa4": 268_798_976, "qmqa": 264_862_976},
    "1.2B": {"qkv": 1_215_102_976, "kv": 1_122_783_232, "gqa8": 1_076_623_360, "mqa": 1_036_233_472,
             "qgqa8": 1_053_543_424, "qmqa": 1_033_348_480},
}


def independent_count(L, H, n, ffn, V, P, q_rows, k_rows, v_rows):
    """Parameter count written out role by role, without the fused-layout code."""
    linear = lambda i, o: i * o + o
    attn = sum(linear(H, rows) for rows in (q_rows, k_rows, v_rows) if rows) + linear(H, H)
    block = 4 * H + attn + linear(H, ffn) + linear(ffn, H)
    return V * H + P * H + L * block + 2 * H


def role_rows(sharing, n, g, d):
    """Rows of each distinct projection (0 where a role reuses another's)."""
    return {"none": (n * d, g * d, g * d), "kv": (n * d, g * d, 0),
            "qk": (n * d, 0, n * d), "qkv": (n * d, 0, 0)}[sharing]


def meta_params(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg).parameters())


@pytest.mark.parametrize("scale", ["300M", "1.2B"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_counts(scale, preset):
    cfg = load_model_config(MODEL_CONFIGS / f"{scale}_{preset}.yaml")
    built = meta_params(cfg)
    expected = independent_count(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.ffn_hidden_size,
                                 cfg.vocab_size, cfg.max_position_embeddings,
                                 *role_rows(cfg.sharing, cfg.num_heads, cfg.kv_heads, cfg.head_dim))
    assert built == expected == total_parameters(cfg)
    if preset in DESIGN_COUNTS[scale]:
        assert built == DESIGN_COUNTS[scale][preset]


def test_untied_head_and_no_bias_counts():
    cfg = load_model_config(MODEL_CONFIGS / "tiny_qgqa4.yaml")
    for change in ({"tie_embeddings": False}, {"bias": False}):
        variant = dataclasses.replace(cfg, **change)
        assert meta_params(variant) == total_parameters(variant) != total_parameters(cfg)


def test_paper_attention_params_gmacs_and_kv_cache_300m():
    load = lambda p: load_model_config(MODEL_CONFIGS / f"300M_{p}.yaml")
    assert [attention_parameters(load(p)) for p in ("qkv", "kv", "k")] == [83_968_000, 62_976_000, 41_984_000]
    gmacs = [round(forward_macs(load(p), 2048, "paper") / 1e9, 2) for p in ("qkv", "qk", "k")]
    assert gmacs == [792.69, 749.74, 706.79]
    kib = {p: kv_cache_bytes_per_token(load(p)) / 1024 for p in ("qkv", "kv", "gqa4", "qgqa4", "mqa", "qmqa")}
    assert kib == {"qkv": 80, "kv": 40, "gqa4": 20, "qgqa4": 10, "mqa": 5, "qmqa": 2.5}


def test_exact_macs_by_hand():
    cfg = load_model_config(MODEL_CONFIGS / "tiny_qmqa.yaml")
    T, H, d = 16, cfg.hidden_size, cfg.head_dim
    proj = T * H * (cfg.num_heads * d + d)  # Q rows plus one shared KV head
    causal = 2 * cfg.num_heads * d * (T * (T + 1) // 2)
    per_layer = proj + causal + T * H * H + 2 * T * H * cfg.ffn_hidden_size
    assert forward_macs(cfg, T) == cfg.num_layers * per_layer + T * H * cfg.vocab_size


def test_cli_table_json_and_markdown(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    for needle in ("305,534,976", "83,968,000", "62,976,000", "41,984,000", "792.69", "749.74", "706.79",
                   "80.00 KiB", "2.50 KiB", "-96.875%", "Compute conventions. paper:"):
        assert needle in text
    assert main(["--scale", "1.2B", "--json"]) == 0
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["1.2B_qmqa"]["parameters"] == 1_033_348_480
    assert rows["1.2B_kv"]["kv_cache_reduction_vs_qkv"] == 0.5
    assert main([str(MODEL_CONFIGS / "tiny_kv.yaml"), "--markdown", "--seq-lens", "64"]) == 0
    out = capsys.readouterr().out
    assert "| tiny_kv | Q–K=V | kv |" in out and "T=64" in out and "KV @ 32K ctx" in out
    assert main([str(MODEL_CONFIGS / "tiny_kv.yaml"), "--context", "256"]) == 0
    assert "KV @ 256 ctx" in capsys.readouterr().out  # not "0K"


def test_cli_reports_bad_input(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("num_layers: 2\nhidden_size: 64\nnum_heads: 8\nffn_hidden_size: 8\n"
                                       "sharing: qk\nnum_kv_heads: 2\n")
    assert main([str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: model.num_kv_heads:" in capsys.readouterr().err
    assert main(["--scale", "7B"]) == 2
    assert "no preset configs for scale '7B'" in capsys.readouterr().err


def test_sequence_parallel_bytes_by_hand(capsys):
    """Per layer and sequence, forward + backward, bf16: a rank sends (SP-1)/SP of its projection output and of
    its attention output. 300M at SP=4, T=2048: QKV's projection is 3 × 1024 columns, Q–K=V's 2 × 1024."""
    qkv = sequence_exchange(load_model_config(MODEL_CONFIGS / "300M_qkv.yaml"), 4, 2048)
    assert qkv["projection_bytes"] == 2 * 2 * 3 * 512 * 3 * 1024 // 4  # 3 destinations × 512 positions × 768 cols
    assert qkv["output_bytes"] == 2 * 2 * 3 * 512 * 1024 // 4
    assert main(["--sp", "4", "--seq-lens", "2048", "--markdown"]) == 0
    text = capsys.readouterr().out
    for row in ("| 300M_kv | Q–K=V | 4 | 1 | 2048 | 3.00 MiB | 0.667× | 1.50 MiB |",
                "| 300M_k | Q=K=V | 4 | 1 | 2048 | 1.50 MiB | 0.333× | 1.50 MiB |",
                "| 300M_qmqa | Q-MQA | 4 | 1 | 2048 | 1.88 MiB | 0.417× | 1.50 MiB |"):
        assert row in text
    assert main(["--sp", "3"]) == 2
    assert "--sp 3: sequence parallel size 3 must divide the 16 query heads" in capsys.readouterr().err
