"""The command-line steps' error boundary: a result line, or one ``error:`` line and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from gpt2_triton.errors import Gpt2TritonError


def run_step(step: Callable[[], str]) -> int:
    """Run ``step`` (which returns the line to print on success) as a CLI exit code."""
    try:
        message = step()
    except Gpt2TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(message)
    return 0
