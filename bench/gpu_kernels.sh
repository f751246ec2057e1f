#!/usr/bin/env bash
# The attention-kernel comparison on one GPU (by hand, under 8 minutes on an H100/H200): training attention
# fwd+bwd for every backend that runs (sdpa, flash-attn, triton) and decode attention (two-pass, blocked
# PyTorch, Triton flash-decoding) per preset at contexts 2K-32K and batches 1-64, with cache bytes read per
# step and the bandwidth as a share of PEAK_GBS (H200: 4800, H100 SXM: 3350; default 4300). Needs torch with
# CUDA and triton; no internet, no data, no DeepSpeed.
#
#   bash bench/gpu_kernels.sh                # writes the tables to stdout (and $OUT/gpu_kernels.md if OUT is set)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
PEAK_GBS="${PEAK_GBS:-4300}"
"$py" -c 'import torch, triton; assert torch.cuda.is_available(), "no CUDA device"; print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name(0)}")'
timeout 480 "$py" "$here/bench/attention.py" --presets qkv kv gqa4 mqa qmqa \
  --contexts 2048 8192 32768 --batches 1 8 64 --train-seq 4096 --train-batch 4 --dtype bf16 --reps 10 \
  --peak-gbs "$PEAK_GBS" | tee "${OUT:-/tmp}/gpu_kernels.md"
