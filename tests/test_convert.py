"""tools/convert_ckpt.py: DeepSpeed <-> consolidated <-> paper <-> HF, resharding, and every error case."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megaqkv.checkpoint import consolidated, deepspeed_format, paper
from megaqkv.convert import main as convert_main
from megaqkv.checkpoint.loading import build_model
from megaqkv.variants import PRESETS

from conftest import MODEL_CONFIGS, REPO, cpu_env, dist_suite, torchrun
from dist_worker import SEQ, random_consolidated
from test_model_exactness import reference_forward

EXACT = 1e-5


class GPTConfig:
    """Stands for the dataclass a training script may pickle into its checkpoints."""


@pytest.fixture(scope="module")
def convert_suite(tmp_path_factory):
    """Real DeepSpeed checkpoints of every preset at TP=2×PP=2 and TP=4 (and GQA-4 at TP=2×DP=2), holding known
    random weights and Adam moments, and a universal checkpoint resumed at four layouts (one 4-process launch)."""
    work = tmp_path_factory.mktemp("ds")
    return work, dist_suite(4, "convert4", work)


@pytest.fixture(scope="module")
def ds_checkpoints(convert_suite):
    return convert_suite[0]


def ds_to_universal(tag_dir, out):
    """DeepSpeed's own converter, as its users run it."""
    run = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                          "--output_folder", str(out / tag_dir.name)], env=cpu_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def universal_dirs(ds_checkpoints, tmp_path_factory):
    """Universal folders of the TP=4 MQA (K/V rows replicated on every rank) and GQA-4 (one KV group per rank of
    the interleaved in_proj) checkpoints."""
    work = tmp_path_factory.mktemp("universal")
    return {p: ds_to_universal(ds_checkpoints / f"{p}_tp4_pp1" / "global_step7", work / p) for p in ("mqa", "gqa4")}


def logits(ck, tokens):
    with torch.no_grad():
        return build_model(ck)(tokens).logits


def tokens_for(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_deepspeed_tp2_pp2_to_consolidated_to_tp1(ds_checkpoints, preset):
    truth = random_consolidated(preset)
    ck = deepspeed_format.read(ds_checkpoints / f"{preset}_tp2_pp2", with_optimizer=True, log=lambda *a: None)
    assert max_diff(ck.weights, truth.weights) == 0.0  # fp32 master weights, merged from TP/PP shards
    for key in ("exp_avg", "exp_avg_sq"):
        assert max_diff(ck.optimizer[key], truth.optimizer[key]) == 0.0
    assert (ck.trainer["step"], ck.trainer["consumed_samples"], ck.trainer["optimizer_step"]) == (7, 56, 7.0)
    tokens = tokens_for(ck.config)
    ours = logits(ck, tokens)
    P = {k: v for k, v in truth.weights.items()}
    ref, _ = reference_forward(ck.config, P, tokens, tokens, torch.ones(tokens.shape))
    assert (ours - ref).abs().max().item() <= EXACT


@pytest.mark.parametrize("preset", list(PRESETS))
def test_consolidated_to_tp4_and_back_is_bit_identical(ds_checkpoints, preset):
    truth = random_consolidated(preset)
    back = deepspeed_format.read(ds_checkpoints / f"{preset}_tp4_pp1", with_optimizer=False)
    assert max_diff(back.weights, truth.weights) == 0.0


@pytest.mark.parametrize("preset", ["mqa", "gqa4"])
def test_universal_folder_converts_exactly(universal_dirs, tmp_path, preset):
    """The universal_checkpoint_info our checkpoints carry lets DeepSpeed's converter merge TP=4 exactly: the
    replicated K/V rows taken once, the interleaved in_proj concatenated by whole KV groups. Read back (format
    detected) as fp32 weights, Adam moments and training position."""
    truth = random_consolidated(preset)
    assert convert_main(["--to", "consolidated", "--input", str(universal_dirs[preset]), "--output",
                         str(tmp_path / "c")]) == 0
    ck = consolidated.load(tmp_path / "c")
    assert max_diff(ck.weights, truth.weights) == 0.0
    for key in ("exp_avg", "exp_avg_sq"):
        assert max_diff(ck.optimizer[key], truth.optimizer[key]) == 0.0
    assert (ck.trainer["step"], ck.trainer["consumed_samples"], ck.trainer["optimizer_step"]) == (7, 56, 7.0)


def test_universal_folder_errors(universal_dirs, tmp_path, capsys):
    from megaqkv.checkpoint import universal

    def fails(path, words):
        assert convert_main(["--from", "universal", "--to", "consolidated", "--input", str(path), "--output",
                             str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert words in err, err

    parent = tmp_path / "uni"
    shutil.copytree(universal_dirs["mqa"], parent)
    (parent / "latest_universal").unlink()
    shutil.copytree(parent / "global_step7", parent / "global_step9")
    fails(parent, "no latest_universal file and 2 universal checkpoint folders (global_step7, global_step9)")
    fails(tmp_path, "not a DeepSpeed universal checkpoint (no zero/ folder); write one with python -m "
                    "deepspeed.checkpoint.ds_to_universal")
    tag = parent / "global_step9"
    (tag / "zero" / "2.ln_1.weight" / "exp_avg.pt").unlink()
    fails(tag, "incomplete universal checkpoint (the conversion did not finish?): "
               f"{tag / 'zero' / '2.ln_1.weight' / 'exp_avg.pt'} missing")
    tag = parent / "global_step7"
    target = tmp_path / "planted"
    torch.save({"param": Planted(f"touch {target}")}, tag / "zero" / "2.ln_1.weight" / "fp32.pt")
    kinds = [k for k, _ in universal.problems(tag)]
    assert kinds == ["unsafe"] and "refused" in universal.problems(tag)[0][1]
    fails(tag, "refused: it needs Python objects unpickled")
    assert not target.exists() and not (tmp_path / "x").exists()


class Planted:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_universal_resume_at_any_layout_continues_the_loss(convert_suite):
    """A TP=2×PP=2 run cut after 3 of 6 steps, converted by ds_to_universal and resumed as checkpoint.load: at
    TP=2 layouts by DeepSpeed's universal loader, at TP=1 (where Q-MQA's replicated K/V projection is part of the
    fused in_proj, a name the folder does not have) through canonical tensors. Losses against the uninterrupted
    run: identical at the same layout, within fp32 rounding at the others."""
    runs = convert_suite[1]["universal resume qmqa"]
    layouts = {k: v for k, v in runs.items() if k.startswith("tp")}
    assert sorted(layouts) == ["tp1 pp1 dp4", "tp1 pp2 dp2", "tp2 pp1 dp2", "tp2 pp2 dp1"]
    for name, r in layouts.items():
        print(f"universal TP=2×PP=2 -> {name}: max |loss diff| {r['loss_diff']:.2e}, max |grad norm diff| "
              f"{r['norm_diff']:.2e}")
        assert (r["step"], r["consumed"]) == (3, 24) and len(r["losses"]) == 3
        native = name.startswith("tp2")
        assert ("with DeepSpeed's universal loader" if native else "in_proj.weight is not among them") in r["said"][0]
        assert r["loss_diff"] <= (0.0 if name == "tp2 pp2 dp1" else 1e-5) and r["norm_diff"] <= 1e-5, r


@pytest.mark.parametrize("name, script, args", [
    ("qmqa_tp2_pp2", "zero_to_fp32.py", []),
    ("gqa4_tp2_pp1", "zero_to_torch.py", ["--dtype", "bf16", "--safe_serialization", "--max_shard_size", "500KB"])])
def test_zero_to_fp32_in_the_checkpoint_directory(ds_checkpoints, tmp_path, name, script, args):
    """The scripts next to a checkpoint, run as DeepSpeed documents them: ours replaces DeepSpeed's zero_to_fp32.py
    (which fails on pipeline checkpoints), and DeepSpeed's zero_to_torch.py runs through it. Output: the state dict
    of the plain TP=1 GPT, merged over TP, PP and ZeRO partitions (TP=2×PP=2, and PP=1 with DP=2)."""
    import yaml
    from safetensors.torch import load_file

    from megaqkv.config import model_config_from_dict
    from megaqkv.model import GPT

    ckpt, out = ds_checkpoints / name, tmp_path / "out"
    ours = REPO / "megaqkv" / "checkpoint" / "zero_to_fp32.py"
    assert (ckpt / "zero_to_fp32.py").read_bytes() == ours.read_bytes() and os.access(ckpt / "zero_to_fp32.py", os.X_OK)
    run = subprocess.run([sys.executable, script, ".", str(out), *args], cwd=ckpt, env=cpu_env(), capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    if "--safe_serialization" in args:
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(set(index.values())) > 1
        state = {k: v for f in sorted(set(index.values())) for k, v in load_file(out / f).items()}
        assert sorted(state) == sorted(index)
    else:
        state = torch.load(out / "pytorch_model.bin", weights_only=True)
    model = GPT(model_config_from_dict(yaml.safe_load((out / "megaqkv_model.yaml").read_text())["model"]))
    model.load_state_dict(state)  # strict: every parameter, nothing else
    dtype = torch.bfloat16 if "bf16" in args else torch.float32
    expected = build_model(random_consolidated(name.split("_")[0])).state_dict()
    assert all(state[k].dtype == dtype and torch.equal(state[k], v.to(dtype)) for k, v in expected.items())


def design_reference_checkpoint(preset: str, path):
    """A reference-format file written from DESIGN §6's key layout, independently of megaqkv's writer."""
    truth = random_consolidated(preset, seed=1)
    cfg, w = truth.config, truth.weights
    n, g = cfg.num_heads, cfg.kv_heads
    sd = {"module.wte.weight": w["wte.weight"], "module.wpe.weight": w["wpe.weight"],
          "module.ln_f.weight": w["ln_f.weight"], "module.ln_f.bias": w["ln_f.bias"]}
    for i in range(cfg.num_layers):
        a = lambda r, kind="weight": w[f"layers.{i}.attn.{r}.{kind}"]
        if cfg.sharing == "none" and g == n:
            attn = {"c_attn": ["q", "k", "v"]}
        elif cfg.sharing == "none":
            attn = {"c_q": ["q"], "c_kv": ["k", "v"]}
        elif cfg.sharing == "qk":
            attn = {"c_kv": ["qk", "v"]}
        elif cfg.sharing == "qkv":
            attn = {"c_k": ["qkv"]}
        elif g == 1:
            attn = {"c_q": ["q"], "c_kv": ["kv"]}
        else:
            attn = {"c_q": ["q"], "c_k": ["kv"]}
        for name, roles in attn.items():
            for kind in ("weight", "bias"):
                sd[f"module.h.{i}.attn.{name}.{kind}"] = torch.cat([a(r, kind) for r in roles])
        for theirs, ours in (("ln_1", "ln_1"), ("ln_2", "ln_2"), ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out"),
                             ("attn.c_proj", "attn.out_proj")):
            for kind in ("weight", "bias"):
                sd[f"module.h.{i}.{theirs}.{kind}"] = w[f"layers.{i}.{ours}.{kind}"]
        sd[f"module.h.{i}.attn.bias"] = torch.ones(1, 1, 256, 256).tril()
    torch.save({"model_state_dict": sd, "model_config": {"n_layer": cfg.num_layers, "n_head": n, "n_embd": cfg.hidden_size,
                                                         "vocab_size": cfg.vocab_size, "block_size": 256, "dropout": 0.1,
                                                         "bias": True},
                "train_config": {"lr": 2e-4}, "step": 1234, "tokens_seen": 5_000_000}, path)
    return truth


@pytest.mark.parametrize("preset", list(PRESETS))
def test_paper_reference_checkpoint_imports(tmp_path, preset):
    truth = design_reference_checkpoint(preset, tmp_path / "final_model.pt")
    ck = paper.read(tmp_path / "final_model.pt")
    assert (ck.config.sharing, ck.config.kv_heads) == (truth.config.sharing, truth.config.kv_heads)
    assert ck.trainer["step"] == 1234
    tokens = tokens_for(ck.config)
    ref, _ = reference_forward(truth.config, truth.weights, tokens, tokens, torch.ones(tokens.shape))
    assert (logits(ck, tokens) - ref).abs().max().item() <= EXACT
    # and back: our writer produces what the reader (and the paper's scripts) expect
    paper.write(ck, tmp_path / "again.pt")
    again = paper.read(tmp_path / "again.pt")
    assert max_diff(again.weights, ck.weights) == 0.0
    keys = torch.load(tmp_path / "again.pt", weights_only=True)["model_state_dict"].keys()
    assert keys == torch.load(tmp_path / "final_model.pt", weights_only=True)["model_state_dict"].keys()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_random_weights_make_every_role_matter(preset):
    """The conversion tests compare logits at 1e-5; with these weights a zeroed or swapped attention role in any
    layer moves them by far more, so a mis-wired conversion cannot pass."""
    truth = random_consolidated(preset)
    tokens = tokens_for(truth.config)
    base = logits(truth, tokens)
    for layer in range(truth.config.num_layers):
        roles = sorted(k for k in truth.weights if k.startswith(f"layers.{layer}.attn.") and "out_proj" not in k)
        # A key-only bias adds q·b to every score of a query: softmax cancels it, no export can get it wrong.
        mutants = [{name: torch.zeros_like(truth.weights[name])} for name in roles if not name.endswith(".k.bias")]
        mutants += [{a: truth.weights[b], b: truth.weights[a]} for i, a in enumerate(roles) for b in roles[i + 1:]
                    if truth.weights[a].shape == truth.weights[b].shape and a.endswith("weight") == b.endswith("weight")]
        assert mutants
        for change in mutants:
            ck = consolidated.Consolidated(truth.config, {**truth.weights, **change})
            assert (logits(ck, tokens) - base).abs().max().item() > 100 * EXACT, sorted(change)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_hf_gpt2_export_logits_equal_ours(tmp_path, preset, capsys):
    transformers = pytest.importorskip("transformers")
    truth = random_consolidated(preset)
    consolidated.save(truth, tmp_path / "c")
    assert convert_main(["--to", "hf-gpt2", "--input", str(tmp_path / "c"), "--output", str(tmp_path / "hf"),
                         "--tokenizer", "none"]) == 0
    model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    tokens = tokens_for(truth.config)
    with torch.no_grad():
        theirs = model(tokens).logits
    assert (theirs - logits(truth, tokens)).abs().max().item() <= EXACT
    if preset == "qkv":  # a GPT-2-shaped model imports into the qkv preset
        assert convert_main(["--to", "consolidated", "--input", str(tmp_path / "hf"), "--output",
                             str(tmp_path / "back")]) == 0
        assert max_diff(consolidated.load(tmp_path / "back").weights, truth.weights) == 0.0


def test_lazy_checkpoint_without_biases_and_a_flash_trained_config(tmp_path):
    import dataclasses

    from megaqkv.parallel.sharding import canonical_shapes

    ck = random_consolidated("qmqa")
    ck.config = dataclasses.replace(ck.config, bias=False, attention_backend="flash")
    keep = canonical_shapes(ck.config)
    ck.weights = {k: v for k, v in ck.weights.items() if k in keep}
    ck.optimizer = {}
    consolidated.save(ck, tmp_path / "c")
    lazy = consolidated.load(tmp_path / "c", lazy=True)
    assert "layers.0.mlp.fc_in.bias" not in lazy.weights and "wte.weight" in lazy.weights
    back = paper.read(paper.write(lazy, tmp_path / "p.pt"))
    assert not back.config.bias and max_diff(back.weights, ck.weights) == 0.0
    tokens = tokens_for(ck.config)  # trained with flash-attn, evaluated here on the CPU: the kernel is re-chosen
    assert torch.isfinite(logits(lazy, tokens)).all()


def test_verify_and_format_detection(tmp_path, capsys):
    truth = random_consolidated("qmqa")
    consolidated.save(truth, tmp_path / "a")
    paper.write(truth, tmp_path / "b.pt")
    assert convert_main(["verify", str(tmp_path / "a"), str(tmp_path / "b.pt")]) == 0
    assert "consolidated" in (out := capsys.readouterr().out) and "paper" in out and "same model" in out
    other = random_consolidated("qmqa", seed=5)
    consolidated.save(other, tmp_path / "c")
    assert convert_main(["verify", str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "DIFFERENT" in capsys.readouterr().out


def test_errors(ds_checkpoints, tmp_path, capsys):
    def fails(args, words):
        assert convert_main(args) == 2
        err = capsys.readouterr().err
        assert words in err, err

    src = tmp_path / "src"
    shutil.copytree(ds_checkpoints / "kv_tp2_pp2", src)
    out = tmp_path / "out"
    # output exists: refused unless --force
    out.mkdir()
    fails(["--to", "consolidated", "--input", str(src), "--output", str(out), "--weights-only"],
          "already exists; choose another --output or pass --force")
    assert convert_main(["--to", "consolidated", "--input", str(src), "--output", str(out), "--weights-only",
                         "--force"]) == 0
    # a missing shard
    tag = src / (src / "latest").read_text()
    (tag / "layer_02-model_01-model_states.pt").unlink()
    fails(["--to", "consolidated", "--input", str(src), "--output", str(tmp_path / "x")],
          f"damaged checkpoint: {tag / 'layer_02-model_01-model_states.pt'}: missing")
    # an incomplete checkpoint (the run died while saving)
    (tag / "megaqkv_complete.json").unlink()
    fails(["--to", "consolidated", "--input", str(src), "--output", str(tmp_path / "x")],
          "incomplete checkpoint (no megaqkv_complete.json")
    # variant / shape mismatch: a config that says qkv over Q–K=V tensors
    cfg_file = out / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("sharing: kv", "sharing: none"))
    fails(["--to", "hf", "--input", str(out), "--output", str(tmp_path / "x")], "tensors do not match the model config")
    # a layout the model cannot take
    good = tmp_path / "good"
    consolidated.save(random_consolidated("gqa4"), good)
    fails(["--to", "deepspeed", "--tp", "3", "--input", str(good), "--output", str(tmp_path / "x")],
          "--tp: tensor parallel size 3 must divide num_heads=16")
    # unknown input, pickled objects in a reference file
    (tmp_path / "notes.txt").write_text("x")
    fails(["--to", "hf", "--input", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "x")],
          "cannot tell its format")
    torch.save({"model_state_dict": {}, "model_config": GPTConfig()}, tmp_path / "pickled.pt")
    fails(["--to", "consolidated", "--input", str(tmp_path / "pickled.pt"), "--output", str(tmp_path / "x")],
          "holds pickled Python objects that a safe load refuses")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- resume after resharding

TINY = ["--model-config", str(MODEL_CONFIGS / "tiny_kv.yaml"), "--train-config", str(REPO / "train_configs" / "tiny.yaml")]
RUN = ["--set", "training.micro_batch_size=4", "--set", "training.global_batch_size=8", "--set", "training.seq_length=64",
       "--set", "training.warmup_steps=2", "--set", "training.train_steps=8", "--set", "eval.interval=0",
       "--set", "eval.tokens=2048", "--set", "checkpoint.interval=0", "--set", "model.hidden_dropout=0.0"]


def pretrain(args):
    proc = subprocess.run(torchrun(2, REPO / "pretrain.py", *TINY, *RUN, *args), env=cpu_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def losses(ckpt):
    rows = [json.loads(l) for l in open(ckpt / "tensorboard" / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_resume_after_resharding_continues_training(tmp_path, slim_data):
    """TP=2 for 4 steps -> DeepSpeed checkpoint at PP=2 (and a consolidated one loaded at DP=2, and a DeepSpeed
    universal one loaded at PP=2 the way DeepSpeed users ask for it) -> 4 more steps, against 8 uninterrupted TP=2
    steps."""
    pretrain(["--tp=2", "--save", str(tmp_path / "full"), *slim_data])
    pretrain(["--tp=2", "--save", str(tmp_path / "a"), *slim_data, "--set", "training.exit_after_steps=4"])
    run = subprocess.run([sys.executable, str(REPO / "tools" / "convert_ckpt.py"), "--to", "deepspeed", "--pp", "2",
                          "--input", str(tmp_path / "a"), "--output", str(tmp_path / "pp2")], env=cpu_env(),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    source = deepspeed_format.read(tmp_path / "a", with_optimizer=False).trainer
    converted = deepspeed_format.read(tmp_path / "pp2", with_optimizer=False).trainer
    assert {k: converted[k] for k in ("tokenizer", "seq_length", "valid")} == \
        {k: source[k] for k in ("tokenizer", "seq_length", "valid")} and source["tokenizer"] == "gpt2"
    out = pretrain(["--pp=2", "--save", str(tmp_path / "pp2"), *slim_data])
    assert "resumed from" in out and "step 4, 32 samples consumed" in out
    assert convert_main(["--to", "consolidated", "--input", str(tmp_path / "a"), "--output", str(tmp_path / "c")]) == 0
    out = pretrain(["--save", str(tmp_path / "dp2"), *slim_data, "--set", f"checkpoint.load={tmp_path / 'c'}"])
    assert "loaded consolidated checkpoint" in out and "step 4, 32 samples consumed" in out
    ds_to_universal(tmp_path / "a" / "global_step4", tmp_path / "universal")
    ds_config = json.loads((REPO / "ds_configs" / "zero1_bf16.json").read_text())
    (tmp_path / "ds.json").write_text(json.dumps({**ds_config, "checkpoint": {"load_universal": True}}))
    out = pretrain(["--pp=2", "--save", str(tmp_path / "universal_pp2"), *slim_data, "--ds-config",
                    str(tmp_path / "ds.json"), "--set", f"checkpoint.load={tmp_path / 'universal'}"])
    assert "with DeepSpeed's universal loader: step 4, 32 samples consumed" in out
    full = losses(tmp_path / "full")
    for run in ("pp2", "dp2", "universal_pp2"):
        resumed = losses(tmp_path / run)
        assert sorted(resumed) == [5, 6, 7, 8]
        diff = max(abs(resumed[s] - full[s]) for s in resumed)
        print(f"resume after resharding TP=2 -> {run}: max loss difference {diff:.2e}")
        assert diff < 1e-4, (run, resumed, full)
