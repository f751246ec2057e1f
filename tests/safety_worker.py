"""Run-safety scenarios of pretrain.py, run one after another in ONE process (tests/test_run_safety.py).

Each scenario calls `pretrain.main` as `python pretrain.py` would (one process, gloo; the process group is
started by the first and reused), capturing what it prints. Rank 0 writes {scenario: {code, out, ...}}.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaqkv.convert import main as convert_main  # noqa: E402
from megaqkv.training.pretrain import main as pretrain_main  # noqa: E402

TINY = ["--model-config", str(REPO / "model_configs" / "tiny_kv.yaml"),
        "--train-config", str(REPO / "train_configs" / "tiny.yaml"),
        "--set", "training.micro_batch_size=4", "--set", "training.global_batch_size=8",
        "--set", "eval.tokens=256", "--set", "eval.interval=0",
        "--set", "logging.interval=1"]


def pretrain(data: list[str], save: Path, *args: str, seq: int = 32) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pretrain_main([*TINY, *data, "--save", str(save), "--set", f"training.seq_length={seq}", *args])
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def metrics(save: Path) -> list:
    return [json.loads(l) for l in (save / "tensorboard" / "metrics.jsonl").read_text().splitlines()]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class Planted:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def reseal(tag_dir: Path) -> None:
    """Rewrite the completion marker's checksums, as an attacker with write access would."""
    from megaqkv.checkpoint import deepspeed_layout as layout

    marker = layout.read_marker(tag_dir)
    marker["files"] = {n: layout.digest(tag_dir / n) for n in layout.checkpoint_files(tag_dir)}
    (tag_dir / layout.MARKER).write_text(json.dumps(marker))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    args, data = p.parse_known_args()  # the rest: pretrain.py's --data-path/--valid-data-path arguments
    work, results = Path(args.workdir), {}
    blocker = socket.socket()  # another job holding the port a fixed default would use
    blocker.bind(("127.0.0.1", 29500))

    # Resume after a crash that lost the newest checkpoint: metrics.jsonl is cut back, each step once.
    run = work / "run"
    first = pretrain(data, run, "--set", "training.train_steps=4", "--set", "checkpoint.interval=2")
    shutil.rmtree(run / "global_step4")
    (run / "latest").write_text("global_step2")
    again = pretrain(data, run, "--set", "training.train_steps=4", "--set", "checkpoint.interval=2")
    results["metrics_cut"] = {"code": [first["code"], again["code"]], "out": again["out"],
                              "steps": [(r["kind"], r["step"]) for r in metrics(run)]}

    # A bit flip in the newest checkpoint: found by its checksum, moved aside, the older one used.
    flip_byte(run / "global_step4" / "layer_01-model_00-model_states.pt")
    results["bit_flip"] = pretrain(data, run, "--set", "training.train_steps=6", "--set", "checkpoint.interval=2")
    results["bit_flip"]["dirs"] = sorted(p.name for p in run.iterdir() if p.name.startswith("global_step"))

    # A truncated file (the disk filled up after the marker was written, a partial copy).
    optim = next((run / "global_step6").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:1000])
    results["truncated"] = pretrain(data, run, "--set", "training.train_steps=8", "--set", "checkpoint.interval=2")

    # A planted pickle, marker resealed: refused naming the file, nothing executed, nothing moved.
    target = work / "planted_file_created"
    optim = next((run / "global_step8").glob("*optim_states.pt"))
    state = torch.load(optim, weights_only=False)
    state["extra"] = Planted(str(target))
    torch.save(state, optim)
    reseal(run / "global_step8")
    results["planted"] = pretrain(data, run, "--set", "training.train_steps=10")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # conversion reads it the same way
        code = convert_main(["--to", "consolidated", "--input", str(run), "--output", str(work / "converted")])
    results["planted_convert"] = {"code": code, "out": out.getvalue(), "err": err.getvalue(),
                                  "written": (work / "converted").exists()}
    results["planted"]["created"] = target.exists()
    results["planted"]["still_there"] = optim.is_file()
    shutil.rmtree(run / "global_step8")

    # Resuming with other data-order settings or another model: refused with what differs.
    results["changed_seed"] = pretrain(data, run, "--set", "training.train_steps=10", "--set", "training.seed=7",
                                       seq=16)
    results["changed_model"] = pretrain(data, run, "--set", "training.train_steps=10", "--set", "model.num_layers=3",
                                        "--set", "model.ffn_hidden_size=256")

    # A second run into a directory a live run holds; then the holder dies (its lock is stale).
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from megaqkv.training.checkpointing import RunLock; lock = RunLock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(120)", str(run), "pretrain.py (first run)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "held"
    results["locked"] = pretrain(data, run, "--set", "training.train_steps=10")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    results["stale_lock"] = pretrain(data, run, "--set", "training.train_steps=7")
    results["stale_lock"]["lock_left"] = (run / "megaqkv_run.lock").exists()

    # Divergence: the loss goes non-finite; the run stops with an error, keeping the last finite checkpoint.
    nan = work / "nan"
    results["diverged"] = pretrain(data, nan, "--set", "training.train_steps=30", "--set", "training.lr=1e6",
                                   "--set", "training.min_lr=0", "--set", "training.warmup_steps=0",
                                   "--set", "training.skip_grad_norm_above=null", "--set", "checkpoint.interval=1",
                                   "--set", "checkpoint.keep_last=1", "--set", "training.max_nonfinite_steps=3")
    results["diverged"]["dirs"] = sorted(p.name for p in nan.iterdir() if p.name.startswith("global_step"))
    results["diverged"]["losses"] = [r["loss"] for r in metrics(nan) if r["kind"] == "train"]
    blocker.close()
    Path(args.out).write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
