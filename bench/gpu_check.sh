#!/usr/bin/env bash
# GPU readiness check: a short 300M training per variant (QKV, Q–K=V, Q-MQA) at sequence length 2048 in bf16,
# on every GPU of this node, printing tokens/s, MFU and peak memory per variant. Needs torch with CUDA and
# this repository installed (pip install -e .); no internet: the data is the corpus shipped in tests/fixtures.
#
#   bash bench/gpu_check.sh                      # the check (about 1-2 minutes per variant on one H100)
#   SCALE=tiny SEQ=128 STEPS=3 bash bench/gpu_check.sh   # the same path in miniature, also on a CPU
#
# Knobs (environment): SCALE (300M), VARIANTS ("qkv kv qmqa"), SEQ (2048), STEPS (6), MICRO (8),
# GLOBAL (1152: the paper's global batch, so the gradient accumulation is the paper's for this node's DP size,
# not 1), PRECISION (bf16), NPROC (number of GPUs, or 1 without one), OUT (a temporary directory).
# MFU is printed in both conventions: ours (exact causal MACs of the real projections) and Megatron-LM's.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
SCALE="${SCALE:-300M}" VARIANTS="${VARIANTS:-qkv kv qmqa}" SEQ="${SEQ:-2048}" STEPS="${STEPS:-6}"
MICRO="${MICRO:-8}" GLOBAL="${GLOBAL:-1152}" PRECISION="${PRECISION:-bf16}"
if [ -z "${NPROC:-}" ]; then
  NPROC="$("$py" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
OUT="${OUT:-$(mktemp -d)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

"$py" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices: " + (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none (CPU)"))'
"$py" "$here/tools/preprocess_data.py" --input "$here/tests/fixtures/SlimPajama-627B" --output-prefix "$OUT/data/slim" \
  --workers 2 --overwrite --no-progress > "$OUT/preprocess.log"

for v in $VARIANTS; do
  echo "== ${SCALE}_$v: $STEPS steps, seq $SEQ, global batch $GLOBAL = micro $MICRO × $NPROC devices × accumulation, $PRECISION"
  rm -rf "$OUT/ckpt_$v"
  "$py" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$here/pretrain.py" \
    --model-config "$here/model_configs/${SCALE}_$v.yaml" --train-config "$here/train_configs/300M.yaml" \
    --data-path "$OUT/data/slim_train_text_document" --valid-data-path "$OUT/data/slim_validation_text_document" \
    --save "$OUT/ckpt_$v" \
    --set training.seq_length="$SEQ" --set training.micro_batch_size="$MICRO" \
    --set training.global_batch_size="$GLOBAL" --set training.train_steps="$STEPS" \
    --set training.train_tokens=null --set training.warmup_steps=5 --set training.precision="$PRECISION" \
    --set eval.interval=0 --set eval.tokens="$((SEQ * MICRO * NPROC))" \
    --set checkpoint.interval=0 --set logging.interval=1 > "$OUT/train_$v.log" 2>&1 \
    || { tail -n 40 "$OUT/train_$v.log"; exit 1; }
  grep -E "^(attention kernels|MFU convention|batch:)" "$OUT/train_$v.log" | sort -u
  grep -E "^(step|validation)" "$OUT/train_$v.log" | tail -n 3
done

"$py" - "$OUT" $VARIANTS <<'EOF'
import json, statistics, sys
from pathlib import Path
out, variants = Path(sys.argv[1]), sys.argv[2:]
print("\n| variant | tokens/s | TFLOP/s per device | MFU | MFU (Megatron's FLOPs) | peak memory per device | final loss |")
print("|---|---|---|---|---|---|---|")
for v in variants:
    rows = [json.loads(l) for l in open(out / f"ckpt_{v}" / "tensorboard" / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    steady = train[len(train) // 3:] or train  # skip warm-up steps (allocator, kernel selection)
    med = lambda k: statistics.median(r[k] for r in steady)
    print(f"| {v} | {med('tokens_per_s'):,.0f} | {med('tflops_per_device'):.3g} | {100 * med('mfu'):.1f}% | {100 * med('mfu_megatron'):.1f}% | "
          f"{max(r['memory_gib'] for r in train):.1f} GiB | {train[-1]['loss']:.3f} |")
print(f"\nlogs and checkpoints in {out}")
EOF
