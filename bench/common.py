"""Shared helpers of the benchmark scripts (never run by CI)."""
from __future__ import annotations

import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, *args, repeat: int = 1):
    """``(result, seconds per call)`` of ``fn(*args)`` with results blocked on."""
    import jax  # noqa: PLC0415

    out = None
    t = time.perf_counter()
    for _ in range(repeat):
        out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - t) / repeat
