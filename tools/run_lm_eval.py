#!/usr/bin/env python3
"""lm-eval's command line with `--model megaqkv` registered (see megaqkv/evaluation/lm_eval_cli.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megaqkv.evaluation.lm_eval_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
