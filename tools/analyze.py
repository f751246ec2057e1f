#!/usr/bin/env python3
"""Parameters, FLOPs and KV-cache bytes per attention variant (see megaqkv/analysis.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megaqkv.analysis import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
