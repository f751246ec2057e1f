#!/usr/bin/env python3
"""Corpus -> Megatron-compatible indexed datasets (see megaqkv/data/preprocess.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megaqkv.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
