"""Hostile but realistic inputs to the evaluation, generation and conversion command lines: each is one line
`error: ...` naming the file, key or flag (exit 2), never a traceback, a silent fallback or a made-up number."""
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from megaqkv.checkpoint import consolidated, hf, paper
from megaqkv.checkpoint.consolidated import CheckpointError
from megaqkv.convert import main as convert_main
from megaqkv.data.indexed import IndexedDatasetWriter
from megaqkv.evaluation.cli import evaluate_main, generate_main
from megaqkv.model.generation import Sampling

from dist_worker import random_consolidated


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One tiny Q–K=V model (with optimizer state) as consolidated, paper and HF (GPT-2 and native) checkpoints."""
    root = tmp_path_factory.mktemp("sources")
    ck = random_consolidated("kv")
    return {"consolidated": consolidated.save(ck, root / "c"), "paper": paper.write(ck, root / "p.pt"),
            "hf": hf.export(ck, root / "hf", kind="gpt2", tokenizer="none"),
            "hf-native": hf.export(ck, root / "native", tokenizer="none")}


def fails(capsys, argv, *words, runner=convert_main):
    """`runner(argv)` exits 2 with a one-line `error: ...` holding `words`; returns that line."""
    assert runner(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def to_consolidated(src, out, *extra):
    return ["--to", "consolidated", "--input", str(src), "--output", str(out), *extra]


def usage_error(capsys, runner, argv, *words):
    with pytest.raises(SystemExit) as exit_:
        runner(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


# ----------------------------------------------------------------------------- evaluate.py and generate.py


def dataset(path, lengths):
    w = IndexedDatasetWriter(path, np.uint16)
    for n in lengths:
        w.add_document(np.arange(n, dtype=np.uint16) % 1000)
    w.finalize()
    return path


@pytest.mark.parametrize("flag, value", [("--tokens", "0"), ("--tokens", "-5"), ("--batch-size", "0"),
                                         ("--batch-size", "-1"), ("--seq-length", "0"), ("--batch-size", "two")])
def test_evaluate_sizes_must_be_positive(capsys, flag, value):
    usage_error(capsys, evaluate_main, ["--checkpoint", "x", "--data", "d", flag, value],
                f"argument {flag}:", "a positive integer", value)


@pytest.mark.parametrize("flag", ["--tp", "--pp", "--dp"])
def test_convert_layout_sizes_must_be_positive(capsys, flag):
    usage_error(capsys, convert_main, ["--to", "deepspeed", "--input", "x", "--output", "y", flag, "0"],
                f"argument {flag}:", "a positive integer", "0")


@pytest.mark.parametrize("lengths, extra", [
    ([1], []),  # a single token: nothing follows it
    ([1] * 6, ["--paper-compatible", "--pad-id", "0"]),  # 1-token documents, each its own sample
    ([30] * 5, ["--split", "test"]),  # 5 documents leave the 1/1000 test share empty
    ([30] * 5, ["--split", "valid", "--split-ratios", "1", "0", "0"]),
])
def test_perplexity_over_zero_tokens_is_an_error(sources, tmp_path, capsys, lengths, extra):
    prefix = dataset(tmp_path / "docs", lengths)
    split = extra[1] if extra[:1] == ["--split"] else "all"
    fails(capsys, ["--checkpoint", str(sources["consolidated"]), "--data", str(prefix), "--seq-length", "16", *extra],
          f"error: {prefix}: no tokens to predict in --split {split}", runner=evaluate_main)


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "-1"), ("--top-k", "-3"), ("--top-p", "0"),
                                         ("--top-p", "1.5"), ("--top-p", "nan"), ("--temperature", "-0.5"),
                                         ("--temperature", "nan"), ("--temperature", "inf")])
def test_generate_rejects_sampling_flags_out_of_range(capsys, flag, value):
    usage_error(capsys, generate_main, ["--checkpoint", "x", "--prompt", "a", flag, value], f"argument {flag}: must be")


@pytest.mark.parametrize("field, value", [("max_new_tokens", -1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.01),
                                          ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf)])
def test_sampling_rejects_values_that_would_silently_mean_greedy_or_no_filter(field, value):
    with pytest.raises(ValueError, match=f"Sampling.{field} must be"):
        Sampling(**{field: value})
    Sampling(max_new_tokens=0, temperature=0.7, top_k=5, top_p=1.0)  # the limits themselves are fine


# ----------------------------------------------------------------------------- damaged checkpoint files


def noise(n):
    return random.Random(n).randbytes(n)


def cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", lambda f: cut(f, f.stat().st_size - 8)),  # data cut short
    ("model.safetensors", lambda f: cut(f, 5)),  # header cut
    ("optimizer.safetensors", lambda f: cut(f, f.stat().st_size // 2)),
    ("optimizer.safetensors", lambda f: f.write_bytes(noise(4096))),
])
def test_damaged_consolidated_safetensors(sources, tmp_path, capsys, name, damage):
    src = shutil.copytree(sources["consolidated"], tmp_path / "c")
    damage(src / name)
    fails(capsys, to_consolidated(src, tmp_path / "out"), f"{src / name}: truncated or corrupt safetensors file")
    for lazy in (True, False):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            consolidated.load(src, lazy=lazy)
    assert not (tmp_path / "out").exists()


def test_damaged_hf_safetensors(sources, tmp_path, capsys):
    src = shutil.copytree(sources["hf"], tmp_path / "hf")
    cut(src / "model.safetensors", 1000)
    fails(capsys, to_consolidated(src, tmp_path / "out"), f"{src / 'model.safetensors'}: truncated or corrupt")


def without(src, dst, *keys):
    ck = torch.load(src, weights_only=True)
    ck["model_state_dict"] = {k: v for k, v in ck["model_state_dict"].items()
                              if not any(k.startswith(f"module.{key}") for key in keys)}
    torch.save(ck, dst)
    return dst


@pytest.mark.parametrize("keys, words", [
    (["h.0.mlp.c_fc.weight"], "model_state_dict has no 'h.0.mlp.c_fc.weight'"),
    (["wte.weight"], "model_state_dict has no 'wte.weight'"),
    (["wpe.weight"], "model_state_dict has no 'wpe.weight'"),
    (["ln_f.bias"], "missing ['ln_f.bias']"),
    (["h.1.attn.c_k.weight"], "missing ['h.1.attn.c_k.weight']"),
    (["h.0.mlp.c_fc.bias"], "missing ['h.0.mlp.c_fc.bias']"),  # not taken for a model without biases
    (["h.1.ln_2.weight", "h.1.attn.c_proj.bias"], "missing ['h.1.ln_2.weight', 'h.1.attn.c_proj.bias']"),
    # layer 0 now reads as Q=K=V: layer 1's c_q must not be dropped silently
    (["h.0.attn.c_q."], "unexpected ['h.1.attn.c_q.weight', 'h.1.attn.c_q.bias']"),
    (["h.1."], "model_config has 2 layers, model_state_dict holds 1"),
])
def test_paper_checkpoint_missing_keys(sources, tmp_path, capsys, keys, words):
    bad = without(sources["paper"], tmp_path / "bad.pt", *keys)
    fails(capsys, to_consolidated(bad, tmp_path / "out"), f"{bad}: ", words)


@pytest.mark.parametrize("damage, words", [
    (lambda f: cut(f, f.stat().st_size // 2), "truncated or corrupt, not a readable torch file"),
    (lambda f: f.write_bytes(noise(3000)), "truncated or corrupt, not a readable torch file"),
    (lambda f: torch.save({"model_state_dict": {"wte.weight": torch.zeros(4, 2)}, "model_config": {}}, f),
     "model_config has n_head None"),
    (lambda f: torch.save({"model_state_dict": {"wte.weight": 3}}, f), "model_state_dict entries ['wte.weight'] are not tensors"),
])
def test_damaged_paper_checkpoint(tmp_path, sources, capsys, damage, words):
    bad = shutil.copy(sources["paper"], tmp_path / "bad.pt")
    damage(bad)
    fails(capsys, to_consolidated(bad, tmp_path / "out"), f"{bad}: {words}")


def edit_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "config.json").unlink(), "not a Hugging Face model directory (no config.json)"),
    (lambda d: (d / "config.json").write_text("{'n_embd': 64,"), "config.json: not valid JSON"),
    (lambda d: (d / "config.json").write_bytes(noise(64) + b"\xff"), "config.json: not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors or pytorch_model.bin"),
    (lambda d: edit_config(d, n_embd=None), "config.json: missing key 'n_embd'"),
    (lambda d: edit_config(d, n_head=3), "config.json: model.hidden_size: 128 is not divisible by num_heads=3"),
    (lambda d: edit_config(d, model_type="llama"), "config.json: model_type 'llama'; megaqkv imports its own"),
    (lambda d: edit_config(d, n_layer=3), "the weights have no 'h.2.ln_1.weight'"),
    (lambda d: edit_config(d, n_positions=64), "wpe.weight has shape (256, 128), the config"),
])
def test_not_an_hf_model(tmp_path, sources, capsys, damage, words):
    src = shutil.copytree(sources["hf"], tmp_path / "hf")
    damage(src)
    fails(capsys, ["--from", "hf", *to_consolidated(src, tmp_path / "out")], f"error: {src}", words)


@pytest.mark.parametrize("damage, words", [
    (lambda d: edit_config(d, num_hidden_layers=3), ("tensors do not match the model config", "missing ['layers.2.")),
    (lambda d: edit_config(d, hidden_size=None), ("config.json: missing key 'hidden_size'",)),
    (lambda d: edit_config(d, sharing="qk", num_key_value_heads=4), ("model.num_kv_heads: sharing 'qk' ties",)),
    (lambda d: edit_config(d, sharing="none"), ("tensors do not match the model config", "missing ['layers.0.attn.k")),
])
def test_damaged_native_hf_model(tmp_path, sources, capsys, damage, words):
    src = shutil.copytree(sources["hf-native"], tmp_path / "native")
    damage(src)
    fails(capsys, to_consolidated(src, tmp_path / "out"), f"error: {src}", *words)


# ----------------------------------------------------------------------------- output problems


@pytest.mark.parametrize("to", ["consolidated", "paper", "hf", "hf-gpt2"])
def test_output_below_a_regular_file(tmp_path, sources, capsys, to):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    fails(capsys, ["--to", to, "--input", str(sources["consolidated"]), "--output", str(out), "--tokenizer", "none"],
          f"error: {out}: cannot write the output (", "check the location")


def test_output_in_a_read_only_directory(tmp_path, sources, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        fails(capsys, to_consolidated(sources["consolidated"], tmp_path / "ro" / "out"),
              f"{tmp_path / 'ro' / 'out'}: cannot write the output (Permission denied")
    finally:
        (tmp_path / "ro").chmod(0o755)


def disk_full(error):
    """A writer that leaves part of a file behind, then fails as it does when the disk fills up."""
    def write(obj, where, *args, **kwargs):
        where = Path(where)
        (where / "part" if where.is_dir() else where).write_bytes(b"partial")
        raise error
    return write


# how each writer reports a full disk (measured on a 64 KiB tmpfs)
SAFETENSORS_FULL = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("to, writer, error", [
    ("consolidated", "megaqkv.checkpoint.consolidated.save_file", SAFETENSORS_FULL),
    ("consolidated", "megaqkv.checkpoint.consolidated.save_file", OSError(28, "No space left on device")),
    ("paper", "torch.save", TORCH_FULL),
    ("hf", "megaqkv.checkpoint.hf.save_file", SAFETENSORS_FULL),
    ("hf-gpt2", "transformers.GPT2LMHeadModel.save_pretrained", SAFETENSORS_FULL)])
def test_failure_midway_leaves_no_output(tmp_path, sources, capsys, monkeypatch, to, writer, error):
    monkeypatch.setattr(writer, disk_full(error))
    out = tmp_path / "out"
    fails(capsys, ["--to", to, "--input", str(sources["consolidated"]), "--output", str(out), "--tokenizer", "none"],
          f"{out}: cannot write the output (", str(error.args[-1]).split(" (")[0])
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary sibling


def test_failure_midway_keeps_the_previous_output(tmp_path, sources, capsys, monkeypatch):
    out = shutil.copytree(sources["consolidated"], tmp_path / "out")
    monkeypatch.setattr("megaqkv.checkpoint.consolidated.save_file", disk_full(SAFETENSORS_FULL))
    fails(capsys, to_consolidated(sources["paper"], out, "--force"), "No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["out"] and consolidated.load(out).config.sharing == "kv"
