#!/usr/bin/env python3
"""Compare training runs of several variants in a table and figures (see megaqkv/ablation/compare.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megaqkv.ablation.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
