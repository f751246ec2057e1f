#!/usr/bin/env python3
"""Train a sentencepiece tokenizer from preprocessing inputs (see megaqkv/data/train_tokenizer.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megaqkv.data.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
