"""Argument types the command line's parsers share (``compressor.app.cli``, the tune CLI)."""

from __future__ import annotations

import argparse


def int_list(text: str) -> tuple[int, ...]:
    """``1,8,32`` as a tuple of positive integers (an argparse ``type``)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values
