"""bench/gpu_check.sh runs the same path on a CPU in miniature (it cannot run on a GPU here)."""
import os
import subprocess

from conftest import REPO


def test_gpu_check_script_in_miniature(tmp_path):
    env = {**os.environ, "SCALE": "tiny", "SEQ": "64", "STEPS": "2", "MICRO": "2", "GLOBAL": "4", "NPROC": "1", "OUT": str(tmp_path),
           "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [l for l in result.stdout.splitlines() if l.startswith("| ") and "variant" not in l]
    assert [row.split("|")[1].strip() for row in table] == ["qkv", "kv", "qmqa"]
    for row in table:
        tokens_per_s, mfu = row.split("|")[2].strip(), row.split("|")[4].strip()
        assert float(tokens_per_s.replace(",", "")) > 0 and mfu.endswith("%")
