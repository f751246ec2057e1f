import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO / "model_configs"
FIXTURES = REPO / "tests" / "fixtures"

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The Triton kernels are tested on CPU tensors through Triton's interpreter, which Triton reads when a kernel
# is defined (megaqkv imports its kernels on first use, after this).
os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict:
    """Environment of multi-process CPU runs: one thread per process, DeepSpeed on its CPU accelerator."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            str(script), *args]


def dist_suite(world: int, suite: str, out_dir: Path) -> dict:
    """Run one suite of tests/dist_worker.py under torchrun; returns {scenario: measurements}."""
    out = out_dir / "results.json"
    cmd = torchrun(world, REPO / "tests" / "dist_worker.py", f"--suite={suite}", f"--out={out}", f"--workdir={out_dir}")
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def slim_data(tmp_path_factory) -> list[str]:
    """The SlimPajama fixture preprocessed once; pretrain.py arguments naming its train and validation splits."""
    from megaqkv.data.preprocess import Options, preprocess

    out = tmp_path_factory.mktemp("data") / "slim"
    preprocess(Options(inputs=[str(FIXTURES / "SlimPajama-627B")], output_prefix=str(out), progress=False))
    return ["--data-path", f"{out}_train_text_document", "--valid-data-path", f"{out}_validation_text_document"]
