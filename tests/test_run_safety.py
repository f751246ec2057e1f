"""Nothing lost, nothing silent: checkpoint integrity, unsafe pickles, run locking, divergence and resume checks.

The end-to-end scenarios run in one process (tests/safety_worker.py, real DeepSpeed engines on gloo); the
mechanisms below them (checksums, the safe loader, choosing a checkpoint, pruning, the lock) are tested directly.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from megaqkv.checkpoint import deepspeed_layout as layout
from megaqkv.checkpoint.consolidated import CheckpointError
from megaqkv.training.checkpointing import RunLock
from megaqkv.training.loop import cut_metrics

from conftest import REPO, cpu_env


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, slim_data):
    work = tmp_path_factory.mktemp("safety")
    out = work / "results.json"
    env = {k: v for k, v in cpu_env().items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "safety_worker.py"), f"--out={out}",
                           f"--workdir={work}", *slim_data], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode or not out.exists():
        pytest.fail(f"safety_worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def test_resume_cuts_metrics_back_to_the_resumed_step(scenarios):
    r = scenarios["metrics_cut"]
    assert r["code"] == [0, 0] and "resumed from" in r["out"] and "global_step2: step 2" in r["out"]
    assert r["steps"] == [["valid", 0], *[["train", s] for s in (1, 2, 3, 4)], ["valid", 4]]


def test_a_bit_flip_is_caught_and_the_older_checkpoint_used(scenarios):
    r = scenarios["bit_flip"]
    assert r["code"] == 0, r["err"]
    assert "global_step4 is damaged" in r["out"] and "layer_01-model_00-model_states.pt: checksum differs" in r["out"]
    assert "moved it to" in r["out"] and "resumed from" in r["out"] and "global_step2: step 2" in r["out"]
    assert r["dirs"] == ["global_step4", "global_step4.damaged", "global_step6"]  # nothing deleted


def test_a_truncated_file_falls_back_naming_it(scenarios):
    r = scenarios["truncated"]
    assert r["code"] == 0, r["err"]
    assert "global_step6 is damaged" in r["out"] and "optim_states.pt: truncated or corrupt" in r["out"]
    assert "PytorchStreamReader" not in r["err"] and "Traceback" not in r["err"]
    assert "global_step4: step 4" in r["out"] and "finished at step 8/8" in r["out"]


def test_a_planted_pickle_is_refused_and_never_runs(scenarios):
    r = scenarios["planted"]
    assert r["code"] == 2 and not r["created"] and r["still_there"]
    assert "optim_states.pt: refused: it needs Python objects unpickled" in r["err"]
    assert "(posix.system)" in r["err"] and "Traceback" not in r["err"]  # DeepSpeed's own classes are not named
    c = scenarios["planted_convert"]
    assert c["code"] == 2 and "unsafe checkpoint" in c["err"] and "refused" in c["err"] and not c["written"]
    assert "ds_to_universal" not in c["out"]  # refused before DeepSpeed's converter (weights_only=False) runs


def test_resume_with_other_data_order_or_model_is_refused(scenarios):
    seed, model = scenarios["changed_seed"], scenarios["changed_model"]
    assert seed["code"] == 2 and "training.seed=1234, training.seq_length=32" in seed["err"]
    assert "this run has training.seed=7, training.seq_length=16" in seed["err"]
    assert "--set training.seed=1234 --set training.seq_length=32" in seed["err"]
    assert model["code"] == 2 and "holds a different model: model.num_layers is 2 there, 3 here, " \
                                  "model.ffn_hidden_size is 512 there, 256 here" in model["err"]
    assert "size mismatch" not in model["err"] and "Traceback" not in model["err"]


def test_a_second_run_into_a_held_directory_is_refused(scenarios):
    locked, stale = scenarios["locked"], scenarios["stale_lock"]
    assert locked["code"] == 2 and "another run is using this checkpoint directory (pid" in locked["err"]
    assert "pretrain.py (first run)" in locked["err"] and "use another --save directory" in locked["err"]
    assert "Traceback" not in locked["err"] and locked["out"].count("resumed from") == 0
    assert stale["code"] == 0 and "which is no longer running; taking it over" in stale["out"]
    assert not stale["lock_left"]


def test_divergence_stops_with_an_error_and_keeps_the_last_finite_checkpoint(scenarios):
    r = scenarios["diverged"]
    assert r["code"] == 1 and "the training loss was not finite for 3 consecutive steps" in r["err"]
    bad = [i for i, loss in enumerate(r["losses"]) if loss != loss or abs(loss) == float("inf")]
    assert len(bad) == 3 and len(r["losses"]) == bad[-1] + 1  # stopped right at the third
    last_finite = f"global_step{bad[0]}"
    assert f"newest checkpoint with a finite loss is" in r["err"] and r["err"].strip().count(last_finite)
    assert last_finite in r["dirs"] and f"global_step{bad[-1] + 1}" not in r["dirs"]  # nothing saved at the stop


def test_single_process_runs_take_a_free_port(scenarios):
    assert scenarios["metrics_cut"]["code"] == [0, 0]  # the worker held 127.0.0.1:29500 throughout


# --------------------------------------------------------------------------- the mechanisms


def fake_checkpoint(directory, step, loss=1.0, payload=b"weights"):
    tag_dir = directory / layout.tag_for(step)
    tag_dir.mkdir(parents=True)
    torch.save({"w": torch.arange(4.0)}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / "blob.bin").write_bytes(payload)
    layout.write_marker(tag_dir, step, {n: layout.digest(tag_dir / n) for n in layout.checkpoint_files(tag_dir)},
                        loss)
    return tag_dir


def test_verify_names_each_kind_of_damage(tmp_path):
    tag_dir = fake_checkpoint(tmp_path, 1)
    assert layout.verify(tag_dir) == []
    (tag_dir / "blob.bin").write_bytes(b"weighTs")
    assert layout.verify(tag_dir) == [("damaged", f"{tag_dir / 'blob.bin'}: checksum differs from the one recorded "
                                                  "when it was saved (corrupted)")]
    (tag_dir / "blob.bin").write_bytes(b"wei")
    assert "3 bytes, 7 when it was saved (truncated?)" in layout.verify(tag_dir)[0][1]
    (tag_dir / "blob.bin").unlink()
    assert layout.verify(tag_dir) == [("damaged", f"{tag_dir / 'blob.bin'}: missing")]
    pt = tag_dir / "mp_rank_00_model_states.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    kinds = layout.verify(tag_dir, (0, 1))
    assert kinds[0] == ("damaged", f"{tag_dir / 'blob.bin'}: missing")
    assert kinds[1][0] == "damaged" and kinds[1][1].startswith(f"{pt}: truncated or corrupt (PytorchStreamReader")
    # the two halves of a job's ranks each verify their share and together see everything
    assert len(layout.verify(tag_dir, (0, 2))) + len(layout.verify(tag_dir, (1, 2))) == 2


def test_choose_falls_back_moves_aside_and_stops_on_a_planted_pickle(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    layout.point_latest(tmp_path, "global_step3")
    (tmp_path / "global_step3" / "blob.bin").write_bytes(b"XXXXXXX")
    said = []
    assert layout.choose(tmp_path, layout.verify, said.append) == "global_step2"
    assert "global_step3 is damaged" in said[0] and (tmp_path / "global_step3.damaged").is_dir()
    target = tmp_path / "planted"
    torch.save({"x": Exploit(str(target))}, tmp_path / "global_step2" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: refused: it needs Python objects unpickled .*\(posix.system\)"):
        layout.choose(tmp_path, layout.verify, said.append)
    with pytest.raises(CheckpointError, match="refused"):
        layout.safe_load(tmp_path / "global_step2" / "mp_rank_00_model_states.pt")
    assert not target.exists() and (tmp_path / "global_step2").is_dir()


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_files_added_after_the_save_are_checked_too(tmp_path):
    tag_dir = fake_checkpoint(tmp_path, 1)
    (tag_dir / "notes.txt").write_text("x")  # DeepSpeed's tools glob for their files: nothing may be slipped in
    assert layout.verify(tag_dir) == [("damaged", f"{tag_dir / 'notes.txt'}: not part of the checkpoint when it "
                                                  "was saved")]
    target = tmp_path / "planted"
    torch.save({"x": Exploit(str(target))}, tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert [k for k, _ in layout.verify(tag_dir)] == ["damaged", "unsafe"] and not target.exists()


def test_a_directory_whose_checkpoints_all_failed_is_not_silently_restarted(tmp_path):
    from types import SimpleNamespace

    from megaqkv.config import Config, ConfigError, load_model_config
    from megaqkv.training.loop import resume

    layout.quarantine(fake_checkpoint(tmp_path, 3))
    layout.point_latest(tmp_path, "global_step3")
    cfg = Config(model=load_model_config(REPO / "model_configs" / "tiny_kv.yaml"))
    with pytest.raises(ConfigError, match="has no checkpoint that verifies, but holds global_step3.damaged, latest"):
        resume(None, cfg, SimpleNamespace(rank=0), tmp_path, print)


def test_load_universal_names_a_folder_that_megaqkv_loads():
    """DeepSpeed's `load_universal` needs checkpoint.load, and is not passed on: megaqkv loads the universal folder,
    and DeepSpeed must not read this run's own later checkpoints as universal ones."""
    from megaqkv.config import Config, ConfigError, load_model_config
    from megaqkv.training.engine import BatchLayout, deepspeed_config

    cfg = Config(model=load_model_config(REPO / "model_configs" / "tiny_kv.yaml"))
    base = {"checkpoint": {"load_universal": True, "tag_validation": "Fail"}}
    with pytest.raises(ConfigError, match="checkpoint.load_universal: name the universal checkpoint to start from "
                                          "with checkpoint.load"):
        deepspeed_config(cfg, BatchLayout(1, 1, 1), base, "ds.json")
    cfg.checkpoint.load = "universal/"
    assert deepspeed_config(cfg, BatchLayout(1, 1, 1), base, "ds.json")["checkpoint"] == {"tag_validation": "Fail"}


def test_a_legacy_marker_without_checksums_still_resumes(tmp_path):
    tag_dir = fake_checkpoint(tmp_path, 5)
    (tag_dir / layout.MARKER).write_text("{}")
    assert layout.verify(tag_dir) == [] and layout.choose(tmp_path, layout.verify, print) == "global_step5"


def test_prune_keeps_the_newest_finite_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 1, loss=2.0)
    fake_checkpoint(tmp_path, 2, loss=float("nan"))
    fake_checkpoint(tmp_path, 3, loss=float("inf"))
    (tmp_path / "global_step4").mkdir()  # a half-written leftover
    layout.prune(tmp_path, keep_last=1, keep="global_step3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step1", "global_step3"]


def test_run_lock(tmp_path):
    lock = RunLock(tmp_path)
    held = json.loads((tmp_path / "megaqkv_run.lock").read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(CheckpointError, match=f"another run is using this checkpoint directory \\(pid {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    assert not (tmp_path / "megaqkv_run.lock").exists()
    # a lock file nobody holds any more (its writer was killed; the PID may have been reused since): taken over
    (tmp_path / "megaqkv_run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    said = []
    RunLock(tmp_path, said.append).release()
    assert said == [f"warning: {tmp_path / 'megaqkv_run.lock'} was left by pid 1 on elsewhere, which is no longer "
                    "running; taking it over"]


def test_cut_metrics_drops_later_rows_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s} for s in (1, 2, 3)] + [{"kind": "valid", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')
    cut_metrics(path, 2)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
    cut_metrics(path, 0)  # a run that starts from step 0 in the same directory
    assert path.read_text() == ""


def test_a_checkpoint_of_other_pipeline_stages_is_named_before_deepspeed_loads_it(tmp_path):
    """Stages balanced another way (megaqkv before every stage held a block) keep other layers' optimizer
    buffers: the parameter names DeepSpeed records per model rank show it before its loader fails obscurely."""
    from types import SimpleNamespace

    from megaqkv.training.checkpointing import stage_split_mismatch

    names = ["tied_modules.wte.weight", "1.weight", "2.ln_1.weight", "3.ln_1.weight", "4.weight"]
    torch.save({"param_shapes": [{n: torch.Size([1]) for n in names[:4]}]}, tmp_path / "mp_rank_01_model_states.pt")
    grid = SimpleNamespace(pp_rank=1, mpu=SimpleNamespace(get_model_parallel_rank=lambda: 1))

    def engine(held):
        return SimpleNamespace(module=SimpleNamespace(named_parameters=lambda: [
            (n, torch.nn.Parameter(torch.zeros(1))) for n in held]))

    assert stage_split_mismatch(tmp_path, engine(names[:4]), grid) is None
    assert stage_split_mismatch(tmp_path, engine(names[:1] + names[3:]), grid) == \
        "stage 1 held layers [1, 2, 3] there and holds [3, 4] here"
