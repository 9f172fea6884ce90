"""Canvas construction (numpy + OpenCV) and the latent mask.

* :func:`resize_frames`: source frames to the frame size of the geometry (area filter when shrinking,
  which is antialiased; bicubic when enlarging).
* :func:`build_canvases`: the black-padded "masked" canvas, the pixel mask (1 = generate, 0 = known) and
  the Telea-inpainted "init" canvas (OpenCV ``INPAINT_TELEA``, radius 5), as the reference.
* :func:`latent_mask`: the pixel mask at latent resolution by strided sampling ``M[::8, ::8]`` (the
  reference's PyTorch nearest-neighbour downsampling takes the top-left pixel of each 8x8 cell, spec
  section 9 item 23).
* :func:`composite`: the generated canvas with the known region replaced by the exact input pixels
  (the reference's truncating float round trip makes many kept pixels off by one; ours does not).
"""
from __future__ import annotations

import cv2
import numpy as np

from m3ddm_jax.outpaint.geometry import Geometry

TELEA_RADIUS = 5


def resize_frames(frames: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """uint8 ``(F, H, W, 3)`` -> uint8 ``(F, h, w, 3)``."""
    h, w = size_hw
    if frames.shape[1:3] == (h, w):
        return frames
    shrink = h < frames.shape[1] or w < frames.shape[2]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in frames])


def pixel_mask(g: Geometry) -> np.ndarray:
    """uint8 ``(canvas_h, canvas_w)``: 1 where the model generates, 0 on the source frame."""
    m = np.ones((g.canvas_h, g.canvas_w), np.uint8)
    m[g.frame_top:g.frame_top + g.frame_h, g.frame_left:g.frame_left + g.frame_w] = 0
    return m


def build_canvases(frames_small: np.ndarray, g: Geometry, inpaint: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(init, masked, mask)``: uint8 ``(F, Hc, Wc, 3)`` x2 and uint8 ``(Hc, Wc)``.

    ``frames_small`` are the frames already at ``(frame_h, frame_w)``.
    """
    n = frames_small.shape[0]
    masked = np.zeros((n, g.canvas_h, g.canvas_w, 3), np.uint8)
    masked[:, g.frame_top:g.frame_top + g.frame_h, g.frame_left:g.frame_left + g.frame_w] = frames_small
    mask = pixel_mask(g)
    if inpaint and mask.any():
        init = np.stack([cv2.inpaint(c, mask, TELEA_RADIUS, cv2.INPAINT_TELEA) for c in masked])
    else:
        init = masked.copy()
    return init, masked, mask


def to_model_range(u8: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], computed as the reference: ``(u / 255 - 0.5) / 0.5``."""
    return ((u8.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1] -> uint8 as the reference: ``round(clip(x / 2 + 0.5, 0, 1) * 255)``."""
    y = np.clip(np.asarray(x, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(y * 255).astype(np.uint8)


def latent_mask(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    """Pixel mask ``(H, W)`` -> latent mask ``(H/8, W/8)`` by taking the top-left pixel of each cell."""
    return np.ascontiguousarray(mask[::factor, ::factor])


def composite(generated_u8: np.ndarray, masked_u8: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Generated pixels where ``mask`` is 1, the input pixels (exactly) where it is 0."""
    keep = mask.astype(bool)[..., None]
    return np.where(keep, generated_u8, masked_u8)
