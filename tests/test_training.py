"""pretrain.py end to end on CPU (torchrun, 2 gloo processes): loss falls, exact resume for TP=2, PP=2 and SP=2,
graceful SIGTERM, crash-safe checkpoints; and the errors a user meets before training starts."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from megaqkv.training.pretrain import main as pretrain_main

from conftest import MODEL_CONFIGS, REPO, cpu_env, torchrun

TINY = ["--model-config", str(MODEL_CONFIGS / "tiny_kv.yaml"), "--train-config", str(REPO / "train_configs" / "tiny.yaml")]
# A small step (8 sequences of 64 tokens) keeps each launch to seconds; hidden dropout stays on (0.1), so exact
# resume also covers the dropout RNG.
SMALL = ["--set", "training.micro_batch_size=4", "--set", "training.global_batch_size=8",
         "--set", "training.seq_length=64", "--set", "training.warmup_steps=2", "--set", "eval.tokens=2048",
         "--set", "logging.interval=1", "--set", "checkpoint.interval=0"]  # eval.at_start: true in tiny.yaml


def launch(args, **popen):
    return subprocess.Popen(torchrun(2, REPO / "pretrain.py", *TINY, *SMALL, *args), env=cpu_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def train(args) -> str:
    proc = launch(args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-6000:]
    return out


def metrics(ckpt):
    rows = [json.loads(l) for l in open(ckpt / "tensorboard" / "metrics.jsonl")]
    return ([(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows if r["kind"] == "train"],
            [(r["step"], r["loss"]) for r in rows if r["kind"] == "valid"])


@pytest.mark.parametrize("layout", ["--tp=2", "--pp=2", "--sp=2"])
def test_loss_falls_and_resume_is_exact(tmp_path, slim_data, layout):
    steps = ["--set", "training.train_steps=8", "--set", "eval.interval=4"]
    full = train([layout, "--save", str(tmp_path / "full"), *slim_data, *steps])
    assert "finished at step 8/8" in full and "TensorBoard logs in" in full
    train_rows, valid_rows = metrics(tmp_path / "full")
    assert train_rows[-1][1] < train_rows[0][1] - 1.0 and valid_rows[-1][1] < valid_rows[0][1] - 1.0
    if layout == "--tp=2":  # the HF export's model card states what the checkpoint records of its training
        from megaqkv.convert import main as convert_main

        assert convert_main(["--to", "hf", "--weights-only", "--input", str(tmp_path / "full"), "--output",
                             str(tmp_path / "hf")]) == 0
        card = (tmp_path / "hf" / "README.md").read_text()
        assert "| training tokens | 4,096 |" in card and "| tokenizer | gpt2 |" in card  # 8 steps × 8 × 64
        assert f"| final validation loss | {valid_rows[-1][1]:.4f} " in card and "step 8, 2,048 tokens" in card
    first = train([layout, "--save", str(tmp_path / "cut"), *slim_data, *steps, "--set", "training.exit_after_steps=3"])
    assert "exit_after_steps=3 at step 3/8" in first
    second = train([layout, "--save", str(tmp_path / "cut"), *slim_data, *steps])
    assert "resumed from" in second and "step 3, 24 samples consumed" in second and "sample order" not in second
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")  # bit-identical losses, norms, LR, validation


def test_sigterm_saves_and_a_half_written_checkpoint_is_skipped(tmp_path, slim_data):
    ckpt = tmp_path / "ckpt"
    proc = launch(["--pp=2", "--save", str(ckpt), *slim_data, "--set", "training.train_steps=500",
                     "--set", "eval.interval=0", "--set", "eval.at_start=false"])
    lines = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("step      2/500"):
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in workers:  # as a cluster scheduler does: every training process gets SIGTERM
        os.kill(int(pid), signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-6000:]
    assert "stopped by signal at step" in out
    tag = (ckpt / "latest").read_text()
    step = int(tag.removeprefix("global_step"))
    assert (ckpt / tag / "megaqkv_complete.json").is_file() and 2 <= step < 500
    # A crash while the next checkpoint was being written: its directory lacks the completion marker, and
    # `latest` is gone too. Resuming must take the last complete checkpoint.
    partial = ckpt / f"global_step{step + 7}"
    shutil.copytree(ckpt / tag, partial)
    (partial / "megaqkv_complete.json").unlink()
    (ckpt / "latest").unlink()
    # and a newer complete one whose weights took a bit flip: the two ranks verify it together, find it damaged
    flipped = ckpt / f"global_step{step + 5}"
    shutil.copytree(ckpt / tag, flipped)
    weights = flipped / "layer_03-model_00-model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    # resumed without validation data: a zero validation share and no validation path build no validation set and
    # turn evaluation off, as in Megatron (the final validation of a finished run included)
    resumed = train(["--pp=2", "--save", str(ckpt), *slim_data[:2], "--set", f"training.train_steps={step + 2}",
                     "--set", "eval.interval=0", "--set", "eval.at_start=false", "--set", "data.valid_path=[]",
                     "--set", "data.split=[1, 0, 0]"])
    assert "no validation set: data.split=[1.0, 0.0, 0.0] gives validation no share" in resumed
    assert "validation at step" not in resumed
    assert "latest is missing; trying the newest complete checkpoint" in resumed
    assert f"checkpoint {flipped} is damaged: {weights}: checksum differs" in resumed
    assert f"resumed from {ckpt}/{tag}: step {step}" in resumed and (ckpt / f"{flipped.name}.damaged").is_dir()
    assert f"finished at step {step + 2}/{step + 2}" in resumed
    assert not partial.exists()  # pruned once a newer complete checkpoint exists
    # the same directory at another layout: a clear message before DeepSpeed tries to load it
    from types import SimpleNamespace

    from megaqkv.config import Config, ConfigError, load_model_config
    from megaqkv.training.loop import resume

    other = SimpleNamespace(tp_size=2, pp_size=1, dp_size=1, sp_size=1, rank=0)
    with pytest.raises(ConfigError, match=r"was written at \{'tp': 1, 'pp': 2, 'dp': 1, 'sp': 1\}, this run is "
                                          r"\{'tp': 2, 'pp': 1, 'dp': 1, 'sp': 1\}; convert it"):
        resume(None, Config(model=load_model_config(MODEL_CONFIGS / "tiny_kv.yaml")), other, ckpt, print)


def run_main(args, monkeypatch, capsys, world=1):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    code = pretrain_main([*TINY, *args])
    return code, capsys.readouterr().err


def test_missing_data_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    prefix = tmp_path / "corpus_train_text_document"
    code, err = run_main(["--data-path", str(prefix)], monkeypatch, capsys)
    assert code == 2
    assert f"{prefix}.bin/.idx: not found. Make it with:" in err
    assert (f"python tools/preprocess_data.py --input tests/fixtures/SlimPajama-627B --output-prefix "
            f"{tmp_path / 'corpus'} --json-keys text") in err
    prefix = tmp_path / "real_sp_text_document"  # one file's output, with a sentencepiece model not trained yet
    sp = tmp_path / "sp.model"
    code, err = run_main(["--data-path", str(prefix), "--set", f"data.tokenizer={sp}"], monkeypatch, capsys)
    assert code == 2 and (f"python tools/train_tokenizer.py --input tests/fixtures/SlimPajama-627B --model-prefix "
                          f"{tmp_path / 'sp'} --vocab-size 50304\n  python tools/preprocess_data.py --input "
                          f"tests/fixtures/SlimPajama-627B --output-prefix {tmp_path / 'real_sp'} --json-keys text "
                          f"--tokenizer {sp}\n(it writes {prefix} from a file or folder of documents") in err


@pytest.mark.parametrize("args, world, words", [
    (["--set", "training.global_batch_size=10"], 2, "training.global_batch_size=10 is not a multiple of "
                                                    "training.micro_batch_size=8 × data-parallel size 2 = 16"),
    (["--set", "training.gradient_accumulation_steps=3"], 1, "disagrees with training.micro_batch_size=8 × "
                                                             "training.gradient_accumulation_steps=3"),
    (["--tp", "2"], 3, "parallel.tp=2 × parallel.pp=1 = 2 does not divide the 3 launched processes"),
    (["--tp", "3"], 3, "tensor parallel size 3 must divide num_heads=16"),
    (["--set", "training.train_steps=null"], 1, "set training.train_tokens"),
    (["--ds-config", "nope.json"], 1, "nope.json: DeepSpeed config not found"),
    (["--set", "training.lr=-1"], 1, "training.lr: must be positive"),
])
def test_inconsistent_settings_fail_before_training(monkeypatch, capsys, slim_data, args, world, words):
    code, err = run_main([*slim_data, *args], monkeypatch, capsys, world)
    assert code == 2 and words in err, err


def test_default_training_config_by_scale(tmp_path):
    from megaqkv.config import ConfigError
    from megaqkv.training.pretrain import default_train_config

    assert [default_train_config(MODEL_CONFIGS / f"{m}.yaml").name for m in ("300M_kv", "1.2B_qmqa", "tiny_qkv")] \
        == ["300M.yaml", "1.2B.yaml", "tiny.yaml"]
    with pytest.raises(ConfigError, match="no training config for scale '7B' .* pass --train-config"):
        default_train_config(tmp_path / "7B_kv.yaml")
