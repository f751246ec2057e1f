"""argparse value types that refuse a bad value when the command line is parsed (a usage error naming the flag,
exit 2) instead of failing later or being quietly taken as something else."""
from __future__ import annotations

import argparse


def checked(kind, ok, what: str):
    """An argparse `type=` converting with `kind` and refusing values that fail `ok`, so a bad flag is a usage
    error naming the flag (exit 2) rather than a silent fallback or a failure after the model has loaded."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return convert


POSITIVE = checked(int, lambda v: v >= 1, "a positive integer")
