#!/usr/bin/env python3
"""Convert checkpoints between DeepSpeed, consolidated, the paper's format and HF (see megaqkv.convert.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megaqkv.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
