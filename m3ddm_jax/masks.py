"""Outpainting masks: one module for training, evaluation and inference (1 = to generate, 0 = known).

Evaluation crops (spec section 7.2): ``crop_ratio`` is the total fraction of the target width (horizontal)
or height (vertical) that is outpainted, half per side: on a 256x144 target 0.25 keeps the centre 192x144
(32 px cut per side) and 0.66 keeps 88x144 (84 px per side). :func:`eval_keep_box` gives the kept box,
:func:`eval_pixel_mask` the corresponding pixel mask. Training mask strategies (M3DDM+ uniform, M3DDM
per-frame) are pure functions of a PRNG key, added below by the training code.
"""
from __future__ import annotations

import numpy as np

from m3ddm_jax.errors import ConfigError

AXES = ("horizontal", "vertical")


def eval_keep_box(height: int, width: int, crop_ratio: float, axis: str = "horizontal") -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the region kept from a ``height x width`` ground-truth frame."""
    if axis not in AXES:
        raise ConfigError(f"mask axis must be one of {AXES}, got {axis!r}")
    if not 0.0 < crop_ratio < 1.0:
        raise ConfigError(f"mask ratio must be in (0, 1), got {crop_ratio}")
    if axis == "horizontal":
        cut = int(width * crop_ratio / 2)
        return 0, cut, height, width - 2 * cut
    cut = int(height * crop_ratio / 2)
    return cut, 0, height - 2 * cut, width


def eval_pixel_mask(height: int, width: int, crop_ratio: float, axis: str = "horizontal") -> np.ndarray:
    """uint8 ``(height, width)``: 1 on the outpainted borders, 0 on the kept centre."""
    top, left, h, w = eval_keep_box(height, width, crop_ratio, axis)
    m = np.ones((height, width), np.uint8)
    m[top:top + h, left:left + w] = 0
    return m
