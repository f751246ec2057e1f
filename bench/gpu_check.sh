#!/usr/bin/env bash
# GPU readiness check, in two parts, on every GPU of this node:
#  1. correctness: per variant, a few steps of the production path (PRECISION, attention_backend auto, compiled
#     blocks) at each layout (TP × PP, and SP: sequence parallelism), against one reference run of the same weights and samples in fp32 with PyTorch's
#     reference attention (attention_backend: math, no compile) at TP=1 PP=1: the first step's loss and gradient
#     norm (the same weights and samples: numerics alone) and the later steps' losses must agree to bf16
#     tolerance (bench/gpu_check_report.py says which run, by how much, and how the tolerances were found);
#  2. speed: a short training per variant and layout at the paper's global batch (so the gradient accumulation
#     is the paper's for this node's DP size), printing tokens/s, TFLOP/s, MFU in our and Megatron's FLOP
#     conventions, peak memory and the kernels used.
# Needs torch with CUDA and this repository installed (pip install -e .); no internet: the data is the corpus
# shipped in tests/fixtures. Checkpoints are off. Exits 1 when a check fails.
#
#   bash bench/gpu_check.sh                                       # QKV, Q–K=V, Q-MQA at 300M, seq 2048
#   SCALE=tiny SEQ=64 STEPS=2 MICRO=2 GLOBAL=4 bash bench/gpu_check.sh   # the same path in miniature, also on a CPU
#
# Knobs (environment): SCALE (300M), VARIANTS ("qkv kv qmqa"), SEQ (2048), STEPS (6), MICRO (8),
# GLOBAL (1152: the paper's global batch), PRECISION (bf16), NPROC (number of GPUs, or 1 without one),
# LAYOUTS (TPxPP[xSP] list; "1x1", plus "2x1 1x2 1x1x2" on a node of 2 or more GPUs), CHECK_STEPS (4; 0 skips part 1),
# CHECK_MICRO (2), OUT (a temporary directory).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
SCALE="${SCALE:-300M}" VARIANTS="${VARIANTS:-qkv kv qmqa}" SEQ="${SEQ:-2048}" STEPS="${STEPS:-6}"
MICRO="${MICRO:-8}" GLOBAL="${GLOBAL:-1152}" PRECISION="${PRECISION:-bf16}"
CHECK_STEPS="${CHECK_STEPS:-4}" CHECK_MICRO="${CHECK_MICRO:-2}"
if [ -z "${NPROC:-}" ]; then
  NPROC="$("$py" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
if [ -z "${LAYOUTS:-}" ]; then
  LAYOUTS="1x1"
  [ "$NPROC" -ge 2 ] && LAYOUTS="1x1 2x1 1x2 1x1x2"
fi
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

"$py" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices: " + (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none (CPU)"))'
"$py" "$here/tools/preprocess_data.py" --input "$here/tests/fixtures/SlimPajama-627B" --output-prefix "$OUT/data/slim" \
  --workers 2 --overwrite --no-progress > "$OUT/preprocess.log"

# train RUN VARIANT LAYOUT [--set ...]: one pretraining without checkpoints; metrics in $OUT/RUN, log $OUT/RUN.log.
train() {
  local run="$1" variant="$2" layout="$3" sp=1
  shift 3
  local tp="${layout%%x*}" rest="${layout#*x}"
  local pp="${rest%%x*}"
  [ "$rest" != "$pp" ] && sp="${rest#*x}"
  rm -rf "${OUT:?}/$run"
  "$py" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$here/pretrain.py" \
    --model-config "$here/model_configs/${SCALE}_$variant.yaml" --train-config "$here/train_configs/300M.yaml" \
    --data-path "$OUT/data/slim_train_text_document" --valid-data-path "$OUT/data/slim_validation_text_document" \
    --tp "$tp" --pp "$pp" --sp "$sp" \
    --set checkpoint.save=false --set logging.tensorboard_dir="$OUT/$run" \
    --set training.seq_length="$SEQ" --set training.train_tokens=null --set eval.interval=0 \
    --set logging.interval=1 "$@" > "$OUT/$run.log" 2>&1 || { tail -n 40 "$OUT/$run.log"; exit 1; }
  grep -E "^(attention kernels|MFU convention|batch:|stage )" "$OUT/$run.log" | sort -u
  grep -E "^(step|validation)" "$OUT/$run.log" | tail -n 2
}

if [ "$CHECK_STEPS" -gt 0 ]; then
  # Dropout off, so that nothing but the kernels, the layout and the precision differs between the runs; the
  # paper's peak learning rate from the second step on.
  check=(--set training.micro_batch_size="$CHECK_MICRO" --set training.global_batch_size="$((CHECK_MICRO * NPROC * 2))"
         --set training.train_steps="$CHECK_STEPS" --set training.warmup_steps=1 --set training.lr=2e-4
         --set training.lr_schedule=constant --set model.hidden_dropout=0 --set eval.tokens="$((SEQ * CHECK_MICRO * NPROC))")
  for v in $VARIANTS; do
    echo "== correctness ${SCALE}_$v: $CHECK_STEPS steps, reference fp32 + math attention at TP 1 PP 1"
    train "ref_$v" "$v" 1x1 "${check[@]}" --set training.precision=fp32 --set model.attention_backend=math \
      --set model.compile=false
    for layout in $LAYOUTS; do
      echo "-- $PRECISION, attention_backend auto, layout TPxPP[xSP] $layout"
      train "check_${v}_$layout" "$v" "$layout" "${check[@]}" --set training.precision="$PRECISION"
    done
  done
fi

for v in $VARIANTS; do
  for layout in $LAYOUTS; do
    echo "== speed ${SCALE}_$v, TPxPP[xSP] $layout: $STEPS steps, seq $SEQ, global batch $GLOBAL = micro $MICRO × DP × accumulation, $PRECISION"
    train "speed_${v}_$layout" "$v" "$layout" --set training.micro_batch_size="$MICRO" \
      --set training.global_batch_size="$GLOBAL" --set training.train_steps="$STEPS" --set training.warmup_steps=5 \
      --set training.precision="$PRECISION" --set eval.tokens="$((SEQ * MICRO * NPROC))"
  done
done

"$py" "$here/bench/gpu_check_report.py" "$OUT" --variants $VARIANTS --layouts $LAYOUTS \
  $([ "$CHECK_STEPS" -gt 0 ] || echo --no-check)
