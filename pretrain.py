#!/usr/bin/env python3
"""Pretrain a megaqkv model: `deepspeed --num_gpus 8 pretrain.py --model-config model_configs/1.2B_qmqa.yaml`.

Also `torchrun --nproc_per_node N pretrain.py ...` or `python pretrain.py ...`; see megaqkv/training/pretrain.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from megaqkv.training.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
