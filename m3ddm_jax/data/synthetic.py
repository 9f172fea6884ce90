"""Small synthetic videos (moving coloured shapes on a gradient) for tests, smoke runs and benchmarks."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def synthetic_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 ``(F, H, W, 3)``: a slowly drifting colour gradient with two moving discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 1, 3)
    vel = rng.uniform(-2, 2, (2, 2))
    pos = rng.uniform([0, 0], [height, width], (2, 2))
    colours = rng.uniform(0, 255, (2, 3))
    radius = rng.uniform(0.12, 0.25, 2) * min(height, width)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for f in range(num_frames):
        t = f / max(num_frames, 1)
        img = np.stack([
            127 + 100 * np.sin(2 * np.pi * (xx / width + base[c] + 0.3 * t) + c) * np.cos(np.pi * yy / height)
            for c in range(3)], -1)
        for k in range(2):
            cy, cx = (pos[k] + vel[k] * f) % [height, width]
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius[k] ** 2
            img[disc] = colours[k]
        out[f] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_synthetic_videos(folder: str | os.PathLike, count: int, *, num_frames: int = 24, height: int = 64,
                           width: int = 80, fps: float = 24.0, seed: int = 0, prefix: str = "clip") -> list[Path]:
    """Write ``count`` lossless MP4 videos into ``folder`` (created); returns their paths."""
    from m3ddm_jax.video import write_video  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = folder / f"{prefix}{i:03d}.mp4"
        write_video(p, synthetic_frames(num_frames, height, width, seed * 1000 + i), fps, lossless=True)
        paths.append(p)
    return paths
