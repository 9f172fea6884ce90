"""Shared command-line plumbing: one-line errors, quiet JAX start-up."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from m3ddm_jax.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line on stderr (exit 2)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; a :class:`UserError` becomes one line on stderr and exit code 1 (no traceback)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return fn() or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
