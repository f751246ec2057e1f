"""Launchers on real clusters: srun/mpirun environments mapped to one torch.distributed job (or refused), and
launch.sh train keeping CUDA_VISIBLE_DEVICES."""
import os
import shutil
import stat
import subprocess
import sys

import pytest

from megaqkv.parallel.launcher_env import LauncherEnvError, launcher_rank, map_launcher_env
from megaqkv.training.pretrain import main as pretrain_main

from conftest import MODEL_CONFIGS, REPO, cpu_env, free_port

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def slurm_task(procid: int, ntasks: int = 2, **extra) -> dict:
    """What srun gives task `procid` of a one-node step (SLURM_NTASKS as srun sets it for the step)."""
    return {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid),
            "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_JOB_NODELIST": "gpu07",
            "SLURM_STEP_NODELIST": "gpu07", **extra}


def executable(path, text: str):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_slurm_tasks_become_ranks_of_one_job():
    env = slurm_task(1)
    line = map_launcher_env(env)
    assert {k: env[k] for k in DIST_VARS} == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                              "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    assert line.startswith("launcher: SLURM (srun), 2 processes: RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/")


def test_slurm_nodelist_expanded_by_scontrol(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "scontrol", '#!/bin/sh\n[ "$*" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env = slurm_task(9, ntasks=16, SLURM_LOCALID="1", SLURM_STEP_NODELIST="gpu[07-08]", MASTER_PORT="31000")
    map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("9", "16", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", "31000")  # a given MASTER_PORT is kept


def test_slurm_nodelist_without_scontrol_asks_for_master_addr(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    with pytest.raises(LauncherEnvError, match=r"cannot expand SLURM_STEP_NODELIST=gpu\[07-08\].*export MASTER_ADDR="):
        map_launcher_env(slurm_task(0, SLURM_STEP_NODELIST="gpu[07-08]"))


def test_open_mpi_ranks_on_one_node_meet_on_localhost():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert map_launcher_env(env).startswith("launcher: Open MPI (mpirun), 2 processes")
    assert {k: env[k] for k in DIST_VARS} == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_mpirun_inside_slurm_uses_the_mpi_ranks():
    # mpirun starts its daemons with srun: its ranks inherit SLURM variables that describe the daemons (one per node)
    env = {**slurm_task(1, ntasks=2), "OMPI_COMM_WORLD_RANK": "13", "OMPI_COMM_WORLD_SIZE": "16",
           "OMPI_COMM_WORLD_LOCAL_RANK": "5", "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "MASTER_ADDR": "gpu07"}
    map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("13", "16", "5")


def test_mpich_and_srun_pmi2():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert map_launcher_env(env).startswith("launcher: MPICH/Intel MPI (mpiexec), 2 processes")
    assert (env["RANK"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "1", "127.0.0.1")
    # srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE but not MPI_LOCALRANKID: SLURM's variables describe the same tasks
    env = {**slurm_task(1), "PMI_RANK": "1", "PMI_SIZE": "2"}
    assert map_launcher_env(env).startswith("launcher: SLURM (srun)") and env["LOCAL_RANK"] == "1"


@pytest.mark.parametrize("env", [
    slurm_task(0, ntasks=1),  # a single srun task: a plain one-process run
    {**slurm_task(0, ntasks=16), "SLURM_STEP_NUM_TASKS": "1"},  # salloc's interactive step (--preserve-env)
    {**slurm_task(1), "RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1"},  # torchrun/deepspeed inside srun decided
    {},
])
def test_left_alone(env):
    before = dict(env)
    assert map_launcher_env(env) is None and env == before


def test_batch_script_process_is_one_process_and_says_so():
    env = {k: v for k, v in slurm_task(0, ntasks=16).items() if not k.startswith("SLURM_STEP")}
    assert "not started by srun: running as one process" in map_launcher_env(env) and "RANK" not in env


@pytest.mark.parametrize("env, words", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, "on several nodes, but MASTER_ADDR is not set: export MASTER_ADDR="),
    ({"PMI_RANK": "3", "PMI_SIZE": "4"}, "(PMI_SIZE=4) but MPI_LOCALRANKID is not set"),
    # an MPI launcher's PMI variables next to SLURM ones of another world (mpiexec's proxies started by srun)
    ({**slurm_task(1), "PMI_RANK": "5", "PMI_SIZE": "16"}, "(PMI_SIZE=16) but MPI_LOCALRANKID is not set"),
    ({**slurm_task(0), "SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not a whole number"),
])
def test_unmappable_is_refused_naming_what_to_set(env, words):
    with pytest.raises(LauncherEnvError) as caught:
        map_launcher_env(env)
    assert words in str(caught.value) and "RANK" not in env


def test_refusal_is_printed_once_and_exits_2(monkeypatch, capsys):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    ranks = []
    for rank in ("0", "1"):
        for key, value in {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": "16",
                           "OMPI_COMM_WORLD_LOCAL_RANK": rank, "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}.items():
            monkeypatch.setenv(key, value)
        code = pretrain_main(["--model-config", str(MODEL_CONFIGS / "tiny_kv.yaml")])
        ranks.append((launcher_rank(), code, capsys.readouterr().err))
    assert [r[:2] for r in ranks] == [("0", 2), ("1", 2)]
    assert ranks[0][2].startswith("error: Open MPI (mpirun) started 16 processes on several nodes")
    assert ranks[1][2] == ""


def test_two_srun_style_processes_form_one_two_rank_job(tmp_path, slim_data):
    """Two real pretrain.py processes carrying only srun's variables (no RANK, WORLD_SIZE, LOCAL_RANK) train as
    one job of 2 ranks (DP 2, gloo), not as two single-rank runs."""
    from test_training import SMALL, TINY

    base = {k: v for k, v in cpu_env().items() if k not in DIST_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    port = str(free_port())
    cmd = [sys.executable, str(REPO / "pretrain.py"), *TINY, *SMALL, *slim_data, "--save", str(tmp_path / "ckpt"),
           "--set", "training.train_steps=2", "--set", "eval.at_start=false"]
    procs = [subprocess.Popen(cmd, env={**base, **slurm_task(i), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-4000:] for o in outs)
    assert "launcher: SLURM (srun), 2 processes: RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/SLURM_STEP_NUM_TASKS/" \
           "SLURM_LOCALID, MASTER_ADDR=127.0.0.1 MASTER_PORT=" + port in outs[0]
    assert "parallel layout: world 2 = TP 1 × PP 1 × DP 2" in outs[0] and "finished at step 2/2" in outs[0]
    assert "resolved configuration" not in outs[1]  # task 1 knew it was rank 1
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step2"


# launch.sh train: the launcher chosen for CUDA_VISIBLE_DEVICES, with a fake nvidia-smi listing 4 GPUs

@pytest.fixture
def fake_node(tmp_path):
    """launch.sh next to a probe pretrain.py (prints what each process got), fake nvidia-smi/deepspeed/python."""
    shutil.copy(REPO / "launch.sh", tmp_path / "launch.sh")
    # One write per line: with PYTHONUNBUFFERED a print() writes each piece apart, and two probes interleave.
    (tmp_path / "pretrain.py").write_text("import os, sys\nos.write(1, f\"probe {os.environ.get('RANK')} "
                                          "{os.environ.get('CUDA_VISIBLE_DEVICES')} {sys.argv[-1]}\\n\".encode())\n")
    fake = tmp_path / "fake"
    fake.mkdir()
    executable(fake / "nvidia-smi", '#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n')
    for name in ("deepspeed", "python"):  # print the command they were given and the devices they would see
        executable(fake / name, f'#!/bin/sh\necho "{name} $* CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}}"\n')
    return tmp_path


def launch_train(node, fake_launchers=True, command="train", **env) -> str:
    base = {k: v for k, v in cpu_env().items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC")}
    path = f"{node / 'fake'}{os.pathsep}{base['PATH']}"
    if not fake_launchers:  # only nvidia-smi is fake: the real deepspeed of this environment starts the probes
        (node / "fake" / "deepspeed").unlink()
        path = f"{node / 'fake'}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{base['PATH']}"
    proc = subprocess.run(["bash", str(node / "launch.sh"), command, "--x"], capture_output=True, text=True,
                          timeout=120, env={**base, "PATH": path, "PYTHON": str(node / "fake" / "python"), **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("env, command", [
    ({}, "deepspeed --num_gpus 4 {node}/pretrain.py --x CUDA_VISIBLE_DEVICES=unset"),
    ({"CUDA_VISIBLE_DEVICES": "1,3"}, "deepspeed {node}/pretrain.py --x CUDA_VISIBLE_DEVICES=1,3"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5e1d,MIG-0b2f"},
     "python -m torch.distributed.run --standalone --nproc_per_node 2 {node}/pretrain.py --x "
     "CUDA_VISIBLE_DEVICES=GPU-5e1d,MIG-0b2f"),
    ({"CUDA_VISIBLE_DEVICES": "", "NPROC": "3"},  # no GPU visible: the CPU processes
     "python -m torch.distributed.run --standalone --nproc_per_node 3 {node}/pretrain.py --x CUDA_VISIBLE_DEVICES="),
])
def test_launch_train_keeps_cuda_visible_devices(fake_node, env, command):
    assert launch_train(fake_node, **env).strip() == command.format(node=fake_node)


@pytest.mark.parametrize("env, command", [
    ({}, "deepspeed --num_gpus 4 {node}/tools/ablate.py --x CUDA_VISIBLE_DEVICES=unset"),
    ({"CUDA_VISIBLE_DEVICES": "", "NPROC": "2"},
     "python -m torch.distributed.run --standalone --nproc_per_node 2 {node}/tools/ablate.py --x CUDA_VISIBLE_DEVICES="),
])
def test_launch_ablate_starts_the_ablation_as_train_starts_pretraining(fake_node, env, command):
    assert launch_train(fake_node, command="ablate", **env).strip() == command.format(node=fake_node)


def test_deepspeed_as_launch_sh_calls_it_gives_each_process_the_visible_gpus(fake_node):
    # deepspeed's CPU accelerator reads CUDA_VISIBLE_DEVICES like the CUDA one; LOCAL_SIZE=4 stands for 4 devices
    out = launch_train(fake_node, fake_launchers=False, CUDA_VISIBLE_DEVICES="1,3", LOCAL_SIZE="4")
    assert sorted(l for l in out.splitlines() if l.startswith("probe")) == ["probe 0 1,3 --x", "probe 1 1,3 --x"]
