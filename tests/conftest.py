"""Shared test set-up: paths to the golden fixtures and absl flag parsing for grain workers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from m3ddm_jax.runtime import tune_malloc

tune_malloc()  # see m3ddm_jax/runtime.py: XLA CPU buffers without mmap page-fault storms

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("M3DDM_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"

try:  # grain worker processes need absl flags marked parsed
    from absl import flags

    flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"golden fixtures not found at {FIXTURES} (set M3DDM_SHARED)")
    return FIXTURES
