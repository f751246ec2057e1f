"""Tensor/pipeline/data parallelism: process grid and mpu, TP layers, vocab-parallel loss, RNG tracking.

DeepSpeed chooses its accelerator when it is first imported; on a machine without a GPU we
choose the CPU one (gloo) before anything imports it, so no CUDA build is attempted.
"""
import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

from .grid import NO_SP, SINGLE, ProcessGrid, SPGroup, TPGroup, init_distributed  # noqa: E402

__all__ = ["NO_SP", "SINGLE", "ProcessGrid", "SPGroup", "TPGroup", "init_distributed"]
