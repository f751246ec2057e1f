#!/usr/bin/env bash
# megaqkv launcher.
#
#   launch.sh train [pretrain.py ARGS]
#       one node: every GPU through the deepspeed launcher, or only those CUDA_VISIBLE_DEVICES lists when it is set
#       (or NPROC processes with torchrun on a CPU machine)
#   launch.sh multinode HOSTFILE MASTER_ADDR [MASTER_PORT] [pretrain.py ARGS]
#       several nodes: the deepspeed launcher reaches the hosts of HOSTFILE ("host slots=8" lines) over ssh/pdsh
#   launch.sh demo [WORKDIR]
#       CPU demo: preprocess the public-domain corpus in tests/fixtures, train a tiny Q–K=V model with TP=2 on
#       2 processes until the validation loss falls, save a checkpoint, print where the TensorBoard logs are
#   launch.sh ablate [VARIANT ...] --dir DIR -- [pretrain.py ARGS]
#       one pretraining per variant (default: the paper's 300M set) with identical data, seed, budget and schedule
#       into DIR/<variant>/, launched as `train` launches, then the comparison table and figures; run it again to
#       skip finished variants and resume an interrupted one (tools/ablate.py)
#   launch.sh analyze [analyze.py ARGS]
#       parameters, FLOPs and KV-cache bytes per variant
#
# srun and mpirun need no wrapper: `srun python pretrain.py ARGS` (one task per GPU) or `mpirun -np N python
# pretrain.py ARGS` forms one job from their variables; examples/slurm/pretrain.sbatch is a documented SLURM job.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"

gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi
}

# Sets `launcher`: the command that starts one pretrain.py per GPU of this node, or NPROC processes on the CPU.
choose_launcher() {
  local n ids
  if [ -z "${CUDA_VISIBLE_DEVICES+set}" ]; then
    n="$(gpus)"
  elif [[ "$CUDA_VISIBLE_DEVICES" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    # No --num_gpus: given it, deepspeed ignores CUDA_VISIBLE_DEVICES and hands its processes GPUs 0..N-1. Given no
    # --num_gpus/--include, it turns CUDA_VISIBLE_DEVICES=2,3 into --include localhost:2,3 itself, starts one
    # process per listed GPU and sets each one's CUDA_VISIBLE_DEVICES to that same list: exactly the user's GPUs.
    # (Passing that --include here would do the same, but make deepspeed log that it is ignoring the variable.)
    launcher=(deepspeed)
    return
  elif [ -n "$CUDA_VISIBLE_DEVICES" ]; then
    # UUIDs (GPU-..., MIG-...), which deepspeed's --include cannot read; torchrun leaves the variable as it is.
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    launcher=("$py" -m torch.distributed.run --standalone --nproc_per_node "${#ids[@]}")
    return
  else
    n=0  # set but empty: CUDA shows this process no GPU
  fi
  if [ "$n" -gt 0 ]; then
    launcher=(deepspeed --num_gpus "$n")
  else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    launcher=("$py" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-1}")
  fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  train)
    choose_launcher
    exec "${launcher[@]}" "$here/pretrain.py" "$@"
    ;;
  multinode)
    [ $# -ge 2 ] || { echo "usage: $0 multinode HOSTFILE MASTER_ADDR [MASTER_PORT] [pretrain.py ARGS]" >&2; exit 2; }
    hostfile="$1" addr="$2"; shift 2
    port=29500
    if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then port="$1"; shift; fi
    [ -f "$hostfile" ] || { echo "error: hostfile $hostfile not found" >&2; exit 2; }
    exec deepspeed --hostfile "$hostfile" --master_addr "$addr" --master_port "$port" "$here/pretrain.py" "$@"
    ;;
  demo)
    work="${1:-demo_run}"
    export OMP_NUM_THREADS=1
    echo "== 1/2 preprocessing tests/fixtures/SlimPajama-627B (public-domain texts) into $work/data"
    "$py" "$here/tools/preprocess_data.py" --input "$here/tests/fixtures/SlimPajama-627B" \
      --output-prefix "$work/data/slim" --workers 2 --overwrite --no-progress
    rm -rf "$work/checkpoints"
    echo "== 2/2 training model_configs/tiny_kv.yaml (Q–K=V) with TP=2 on 2 CPU processes"
    "$py" -m torch.distributed.run --standalone --nproc_per_node 2 "$here/pretrain.py" \
      --model-config "$here/model_configs/tiny_kv.yaml" --train-config "$here/train_configs/tiny.yaml" --tp 2 \
      --data-path "$work/data/slim_train_text_document" \
      --valid-data-path "$work/data/slim_validation_text_document" --save "$work/checkpoints"
    "$py" - "$work/checkpoints" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(l) for l in open(Path(sys.argv[1]) / "tensorboard" / "metrics.jsonl")]
valid = [r for r in rows if r["kind"] == "valid"]
first, last = valid[0], valid[-1]
print(f"demo: validation loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']}), "
      f"checkpoint {Path(sys.argv[1]).resolve() / open(Path(sys.argv[1]) / 'latest').read().strip()}, "
      f"TensorBoard: tensorboard --logdir {(Path(sys.argv[1]) / 'tensorboard').resolve()}")
EOF
    ;;
  ablate)
    choose_launcher
    exec "${launcher[@]}" "$here/tools/ablate.py" "$@"
    ;;
  analyze) exec "$py" "$here/tools/analyze.py" "$@" ;;
  *)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
