"""Config loading: every invalid combination is rejected at load time, naming the file and the key."""
import re

import pytest
import torch
import yaml

from megaqkv.config import ConfigError, Loader, load_config, load_model_config, model_config_from_dict
from megaqkv.variants import PRESETS

from conftest import MODEL_CONFIGS


def write(tmp_path, text, name="m.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """num_layers: 2
hidden_size: 64
num_heads: 8
ffn_hidden_size: 256
"""


@pytest.mark.parametrize("scale", ["300M", "1.2B", "tiny", "cpu"])
def test_every_preset_file_loads_with_its_variant(scale):
    for preset, (sharing, g) in PRESETS.items():
        cfg = load_model_config(MODEL_CONFIGS / f"{scale}_{preset}.yaml")
        assert cfg.sharing == sharing
        assert cfg.kv_heads == (cfg.num_heads if g is None else g)


def test_defaults_follow_the_paper(tmp_path):
    cfg = load_model_config(write(tmp_path, BASE))
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.layernorm_eps, cfg.init_std) == (50304, 2048, 1e-5, 0.02)
    assert (cfg.embedding_dropout, cfg.attention_dropout, cfg.hidden_dropout) == (0.0, 0.0, 0.1)
    assert cfg.bias and cfg.tie_embeddings and cfg.sharing == "none" and cfg.kv_heads == 8


@pytest.mark.parametrize("change, key, words", [
    ({"num_kv_head": 4}, "model.num_kv_head", "did you mean 'num_kv_heads'"),
    ({"hidden_size": 60}, "model.hidden_size", "not divisible by num_heads=8"),
    ({"num_kv_heads": 3}, "model.num_kv_heads", "does not divide num_heads=8"),
    ({"num_kv_heads": 0}, "model.num_kv_heads", "at least 1"),
    ({"sharing": "qk", "num_kv_heads": 4}, "model.num_kv_heads", "must equal num_heads=8"),
    ({"sharing": "qkv", "num_kv_heads": 1}, "model.num_kv_heads", "must equal num_heads=8"),
    ({"sharing": "vk"}, "model.sharing", "must be one of 'none', 'qk', 'kv', 'qkv'"),
    ({"attention_backend": "xformers"}, "model.attention_backend", "must be one of 'auto', 'sdpa', 'flash'"),
    ({"num_heads": "eight"}, "model.num_heads", "expected an integer"),
    ({"bias": 1}, "model.bias", "expected true or false"),
    ({"hidden_dropout": 1.5}, "model.hidden_dropout", "must be in [0, 1)"),
    ({"layernorm_eps": 0}, "model.layernorm_eps", "must be positive"),
    ({"num_layers": 0}, "model.num_layers", "positive integer"),
])
def test_invalid_combinations_name_file_and_key(tmp_path, change, key, words):
    path = write(tmp_path, yaml.safe_dump({**yaml.safe_load(BASE), **change}))
    with pytest.raises(ConfigError) as err:
        load_model_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}:"), message
    assert words in message


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "num_layers: 2\nhidden_size: 64\nnum_heads: 8\n")
    with pytest.raises(ConfigError, match=r"model\.ffn_hidden_size: required key is missing"):
        load_model_config(path)


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_model_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_config(write(tmp_path, "num_layers: [2\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_model_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(path, overrides=["model.num_kv_heads=2", "model.sharing=kv", "model.hidden_dropout=0"]).model
    assert (cfg.num_kv_heads, cfg.sharing, cfg.hidden_dropout) == (2, "kv", 0.0)
    with pytest.raises(ConfigError, match=r"--set model.num_kv_heads=3\): model.num_kv_heads: 3 does not divide"):
        load_config(path, overrides=["model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"--set model.num_head=4: model.num_head: unknown key \(did you mean"):
        load_config(path, overrides=["model.num_head=4"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, overrides=["model.num_heads"])
    with pytest.raises(ConfigError, match="'model.num_heads' is a value, not a section"):
        load_config(path, overrides=["model.num_heads.x=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, overrides=["model.num_heads=[1]"])
    with pytest.raises(ConfigError, match=r"checkpoint.dir: out is given, but checkpoint.save is false"):
        load_config(path, overrides=["checkpoint.save=false", "checkpoint.dir=out"])


def test_plain_data_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "sharing: kv\nnum_kv_heads: 1\n"))
    data = cfg.to_dict()
    assert isinstance(data["model"], dict)
    assert model_config_from_dict(data["model"]) == cfg.model
    with pytest.raises(ConfigError, match="ckpt: model.sharing"):
        model_config_from_dict({**data["model"], "sharing": "bogus"}, source="ckpt")


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1e5", 1e5), ("+1E5", 1e5), ("-2e-3", -2e-3),
                                         ("1.0e5", 1e5), ("3e", "3e"), ("1e-4abc", "1e-4abc")])
def test_exponent_floats_without_a_dot_are_floats(text, value):
    assert yaml.load(text, Loader=Loader) == value
    assert yaml.safe_load("3e-4") == "3e-4"  # PyYAML's own loader is left as it is


def test_exponent_floats_in_files_and_overrides(tmp_path):
    run = write(tmp_path, "training:\n  lr: 3e-4\n  min_lr: 1e-5\n", "run.yaml")
    assert load_config(write(tmp_path, BASE), run).training.lr == 3e-4
    cfg = load_config(write(tmp_path, BASE), overrides=["training.lr=3e-4", "training.eps=1e-8"]).training
    assert (cfg.lr, cfg.eps) == (3e-4, 1e-8)


@pytest.mark.parametrize("override", ["training.lr=.nan", "training.grad_clip=.inf", "model.init_std=-.inf",
                                      "training.skip_grad_norm_above=.nan", "training.betas=[0.9, .nan]",
                                      "parallel.collective_timeout_s=1e400"])
def test_non_finite_floats_are_rejected_naming_the_key(tmp_path, override):
    key = override.split("=")[0] + ("[1]" if "betas" in override else "")
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: must be a finite number"):
        load_config(write(tmp_path, BASE), overrides=[override])


@pytest.mark.parametrize("content", [b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xff\xfe\x80", bytes(range(256)),
                                     b"num_layers: 2\x00\n"])
def test_binary_files_are_not_configs(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not a text YAML file"):
        load_model_config(path)


def test_torch_checkpoint_is_not_a_config(tmp_path):
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, tmp_path / "ck.pt")
    with pytest.raises(ConfigError, match="ck.pt: not a text YAML file"):
        load_config(write(tmp_path, BASE), tmp_path / "ck.pt")


def test_duplicate_keys_name_both_lines(tmp_path):
    path = write(tmp_path, BASE + "hidden_dropout: 0.0\nnum_layers: 4\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: .*duplicate key 'num_layers' on lines 1 and 6"):
        load_model_config(path)
    run = write(tmp_path, "training:\n  lr: 1e-3\n  warmup_steps: 5\n  lr: 2e-3\n", "run.yaml")
    with pytest.raises(ConfigError, match="run.yaml: .*duplicate key 'lr' on lines 2 and 4"):
        load_config(write(tmp_path, BASE), run)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(write(tmp_path, BASE), overrides=["data.path={a: 1, a: 2}"])


@pytest.mark.parametrize("overrides, first", [(["training.lr=1e-3", "training.lr=2e-3"], "training.lr=1e-3"),
                                              (["training={lr: 1}", "training.lr=2e-3"], "training={lr: 1}")])
def test_duplicate_overrides_name_both(tmp_path, overrides, first):
    with pytest.raises(ConfigError, match=re.escape(f"--set {overrides[1]}: {first.split('=')[0]} is already set "
                                                    f"by --set {first}")):
        load_config(write(tmp_path, BASE), overrides=overrides)


def test_failure_and_timeout_limits():
    cfg = load_config(MODEL_CONFIGS / "tiny_kv.yaml")
    assert (cfg.training.max_nonfinite_steps, cfg.parallel.collective_timeout_s) == (10, 600.0)
    for override, words in [("training.max_nonfinite_steps=0", "must be at least 1"),
                            ("parallel.collective_timeout_s=0", "must be positive"),
                            ("parallel.collective_timeout_s=-5", "must be positive"),
                            ("eval.seed=-1", "must not be negative")]:
        with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: {words}"):
            load_config(MODEL_CONFIGS / "tiny_kv.yaml", overrides=[override])
