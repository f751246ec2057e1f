"""Training pieces that need no process group: LR schedule, parameter groups, stopping, checkpoint tags."""
import dataclasses
import math

import pytest
import torch

from megaqkv.checkpoint import deepspeed_layout as layout
from megaqkv.config import Config, TrainingConfig, load_model_config
from megaqkv.model import GPT
from megaqkv.training import checkpointing
from megaqkv.training.engine import build_optimizer
from megaqkv.training.loop import total_steps
from megaqkv.training.schedule import WarmupDecay

from conftest import MODEL_CONFIGS


def test_warmup_then_cosine_to_min_lr():
    cfg = TrainingConfig(lr=2e-4, min_lr=2e-5, warmup_steps=500)
    f = WarmupDecay(cfg, total_steps=4239)
    assert f(0) == pytest.approx(1 / 500) and f(249) == pytest.approx(0.5) and f(499) == pytest.approx(1.0)
    assert f(500 + (4239 - 500) // 2) == pytest.approx(0.55, abs=1e-3)  # half way: (1 + 0.1) / 2
    assert f(4239) == pytest.approx(0.1) and f(10_000) == pytest.approx(0.1)  # floor = min_lr / lr
    linear = WarmupDecay(dataclasses.replace(cfg, lr_schedule="linear"), 4239)
    assert linear(500 + (4239 - 500) // 2) == pytest.approx(0.55, abs=1e-3)
    assert WarmupDecay(dataclasses.replace(cfg, lr_schedule="constant"), 10)(9999) == 1.0


def test_weight_decay_groups():
    model = GPT(load_model_config(MODEL_CONFIGS / "tiny_kv.yaml"))
    paper = build_optimizer(model.named_parameters(), TrainingConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in paper.param_groups] == [0.1]  # the paper decays every parameter
    split = build_optimizer(model.named_parameters(), TrainingConfig(weight_decay=0.1, decay_norms_and_biases=False))
    decayed, exempt = split.param_groups
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in exempt["params"])
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))


def test_stopping_by_tokens_or_steps():
    cfg = Config(model=load_model_config(MODEL_CONFIGS / "300M_kv.yaml"),
                 training=TrainingConfig(global_batch_size=1152, seq_length=2048, train_tokens=10_000_000_000))
    assert total_steps(cfg) == math.ceil(10e9 / 2_359_296) == 4239
    cfg.training = dataclasses.replace(cfg.training, train_tokens=None, train_steps=7)
    assert total_steps(cfg) == 7


def test_choose_prefers_latest_and_skips_incomplete(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        (tmp_path / f"global_step{step}").mkdir()
        if complete:
            (tmp_path / f"global_step{step}" / layout.MARKER).write_text("{}")
    said = []
    assert layout.choose(tmp_path, layout.verify, said.append) == "global_step20"
    assert said == [f"warning: {tmp_path / 'latest'} is missing; trying the newest complete checkpoint"]
    (tmp_path / "latest").write_text("global_step10")
    assert layout.choose(tmp_path, layout.verify, said.append) == "global_step10" and len(said) == 1
    (tmp_path / "latest").write_text("global_step30")
    assert layout.choose(tmp_path, layout.verify, said.append) == "global_step20"
    assert "names 'global_step30', which is incomplete" in said[-1]
    layout.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step20", "latest"]


def test_prune_never_removes_the_checkpoint_just_written(tmp_path):
    for step in (1000, 2000, 3000, 100):  # an older run's later steps, then this run's first save
        (tmp_path / f"global_step{step}").mkdir()
        (tmp_path / f"global_step{step}" / layout.MARKER).write_text("{}")
    layout.prune(tmp_path, keep_last=3, keep="global_step100")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step100", "global_step1000", "global_step2000",
                                                          "global_step3000"]


def test_resume_refuses_a_used_directory_without_resume(tmp_path):
    from megaqkv.config import ConfigError
    from megaqkv.training.loop import resume

    (tmp_path / "global_step5").mkdir()
    (tmp_path / "global_step5" / layout.MARKER).write_text("{}")
    cfg = Config(model=load_model_config(MODEL_CONFIGS / "tiny_kv.yaml"))
    cfg.checkpoint.resume = False
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run and checkpoint.resume is false"):
        resume(None, cfg, None, tmp_path, print)


def test_rng_state_round_trip():
    from megaqkv.parallel.random import RNGTracker

    tracker = RNGTracker()
    tracker.seed(5)
    state = checkpointing.rng_state(tracker)
    a = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    checkpointing.set_rng_state(state, tracker)
    assert torch.equal(torch.rand(3), a)
    with tracker.fork():
        assert torch.equal(torch.rand(3), b)
