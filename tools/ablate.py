#!/usr/bin/env python3
"""Train attention variants on identical data, seed, budget and schedule, then compare them (see megaqkv/ablation/ablate.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megaqkv.ablation.ablate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
