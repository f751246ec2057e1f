"""`megaqkv-lm-eval` (tools/run_lm_eval.py): lm-evaluation-harness's own command line, every option as in
`lm_eval`, with megaqkv's model registered first, so `--model megaqkv --model_args checkpoint=PATH` resolves.

Plain `lm_eval --model megaqkv` cannot: lm-eval looks model names up in a registry filled only by its own
modules and by modules imported before the lookup, and it reads no plugin entry points (0.4.13). Running code
in every Python start-up of the environment (a .pth file) to import megaqkv there was rejected as a hack.
"""
from __future__ import annotations

import sys


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        print(f"error: lm-evaluation-harness is needed ({exc}); pip install -e '.[eval]'", file=sys.stderr)
        return 2
    from . import harness  # noqa: F401  registers --model megaqkv

    cli_evaluate()
    return 0
