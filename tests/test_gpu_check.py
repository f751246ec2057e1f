"""bench/gpu_check.sh runs the same path on a CPU in miniature (it cannot run on a GPU here), and its verdict fails
where a run leaves the reference."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check_report  # noqa: E402


def test_gpu_check_script_in_miniature(tmp_path):
    """Q-MQA at PP=2 (where the check found bf16 losing the head's gradient) and at SP=2 on two processes, against
    the fp32 math reference at TP=1 × DP=2, then the speed part; TP=2 in bf16 is tests/test_parallel.py's."""
    env = {**os.environ, "SCALE": "tiny", "VARIANTS": "qmqa", "SEQ": "64", "STEPS": "2", "MICRO": "2", "GLOBAL": "4",
           "NPROC": "2", "LAYOUTS": "1x2 1x1x2", "CHECK_STEPS": "2", "OUT": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                            timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not any(cwd.iterdir()) and not list(tmp_path.glob("*/latest"))  # checkpoint.save=false: none written
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| qmqa")]
    checks, speeds = rows[:2], rows[2:]
    assert [r[1].strip() for r in checks] == [r[1].strip() for r in speeds] == ["1x2", "1x1x2"]
    assert "world 2 = TP 1 × SP 2 × PP 1 × DP 1" in (tmp_path / "check_qmqa_1x1x2.log").read_text()
    for row in checks:
        assert all(cell.strip().endswith("ok") for cell in row[3:]), row
    assert "attention kernels: training and prefill math" in result.stdout  # the reference ran the math kernel
    for row in speeds:
        assert float(row[2].replace(",", "")) > 0 and row[4].strip().endswith("%")


def rows(losses, grad_norms):
    return [{"kind": "train", "step": i + 1, "loss": l, "grad_norm": g} for i, (l, g) in enumerate(zip(losses, grad_norms))]


@pytest.mark.parametrize("got, failed", [
    (rows([10.0, 9.0, 8.0], [4.0, 3.0, 2.0]), None),
    (rows([10.01, 9.0, 8.0], [4.0, 3.0, 2.0]), None),
    (rows([10.03, 9.0, 8.0], [4.0, 3.0, 2.0]), "step 1 loss"),  # 3e-3: the first step is numerics alone
    (rows([10.0, 9.0, 8.0], [4.1, 3.0, 2.0]), "step 1 gradient norm"),  # 2.5% (non-causal attention: 8.8%)
    (rows([10.0, 9.0, 8.1], [4.0, 3.0, 2.0]), "step 3 loss"),
    (rows([10.0, 9.0, float("nan")], [4.0, 3.0, 2.0]), "step 3 loss"),
    (rows([10.0, 9.0], [4.0, 3.0]), "steps [1, 2] instead of [1, 2, 3]"),
])
def test_the_verdict_fails_outside_the_tolerances(tmp_path, capsys, got, failed):
    for run, data in (("ref_kv", rows([10.0, 9.0, 8.0], [4.0, 3.0, 2.0])), ("check_kv_1x1", got),
                      ("speed_kv_1x1", rows([10.0], [4.0]))):
        (tmp_path / run).mkdir()
        extra = {"tokens_per_s": 1.0, "tflops_per_device": 1.0, "mfu": 0.1, "mfu_megatron": 0.1, "memory_gib": 1.0}
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps({**r, **extra}) + "\n" for r in data))
    code = gpu_check_report.main([str(tmp_path), "--variants", "kv", "--layouts", "1x1"])
    err = capsys.readouterr().err
    assert code == (1 if failed else 0)
    assert (f"FAILED: kv at layout 1x1: {failed}" in err) if failed else err == ""
