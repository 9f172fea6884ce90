"""Outpainting: canvas geometry, window schedule, the jitted per-window sampler and the video pipeline.

Submodules load on first attribute access (``m3ddm_jax.outpaint.pipeline.Outpainter`` works right after
``import m3ddm_jax``)."""
from __future__ import annotations

import importlib

_SUBMODULES = {"canvas", "geometry", "pipeline", "sampler", "windows"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
