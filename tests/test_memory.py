"""Flat memory in video length (issue 11, item 4), cheaply: the streaming path gives the array path's frames
bit for bit, and the pipeline never holds more than a couple of source frames (a fake lazy source counts the
live ones). The peak-RSS measurement over 300 vs 3,000 frames is bench/memory.py (too slow for CI).

Tiny models, 2 steps, --output-size 64: one compiled sampler for the module.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from m3ddm_jax.assets import TINY_UNET, TINY_VAE
from m3ddm_jax.outpaint.pipeline import M3DDMPipeline, OutpaintConfig, Outpainter
from m3ddm_jax.video import VideoReader, read_video, write_video

N, H, W = 52, 48, 32    # >= 50 frames: the coarse strides (15, 5) run too, not only stride 1


def clip_frames(n: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w]
    f = np.stack([np.stack([(xx * 5 + 3 * i) % 256, (yy * 4 + i) % 256, (xx + yy + 9 * i) % 256], -1) for i in range(n)])
    return np.clip(f + rng.integers(-4, 5, f.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def models():
    from m3ddm_jax.weights import load_models

    return load_models(TINY_UNET, TINY_VAE)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mkv", clip_frames(N, H, W), 24, lossless=True)


@pytest.mark.parametrize("full_res, limit", [(False, None), (True, 20)])
def test_streaming_path_equals_array_path(models, clip, full_res, limit):
    """Same input, same frames: uint8 array in -> array out, VideoReader in -> frames to a sink, and
    M3DDMPipeline on the path (streamed), all bit-identical. 52 frames run the coarse strides too (6 windows);
    --full-res (with --limit 20: the second read stops early) re-reads the source while emitting."""
    unet, vae = models
    cfg = dict(ratio="16:9", output_size=64, steps=2, full_res=full_res, limit=limit)
    video = read_video(clip)
    op = Outpainter(unet, vae, OutpaintConfig(**cfg))
    a = op(video.frames, video.fps)
    sunk = []
    b = op(VideoReader(clip), video.fps, sink=sunk.append)
    assert b.frames is None and b.shape == a.frames.shape == (limit or N, *a.frames.shape[1:])
    assert a.windows == b.windows == (2 if limit else 6)
    np.testing.assert_array_equal(np.stack(sunk), a.frames)
    if not limit:
        return  # the pipeline on a path: once, on the short run
    pipe = M3DDMPipeline(unet, vae)
    c = pipe(str(clip), ratio="16:9", output_size=64, num_inference_steps=2, full_res=full_res, limit=limit,
             progress=False)
    np.testing.assert_array_equal(c.frames, a.frames)
    assert c.source == clip


class CountingSource:
    """A lazy source that makes 360x640 frames on demand and tracks how many are still alive."""

    def __init__(self, n: int):
        self.num_frames, self.height, self.width = n, 360, 640
        self.passes = 0
        self.alive: list[weakref.ref] = []
        self.max_alive = 0

    def frame(self, i: int) -> np.ndarray:
        f = np.empty((self.height, self.width, 3), np.uint8)
        f[...] = (np.arange(self.width, dtype=np.uint16)[None, :, None] + 7 * i) % 256
        f[: 20 + i % 40, :, 1] = 200
        return f

    def __iter__(self):
        self.passes += 1
        for i in range(self.num_frames):
            gc.collect()
            self.alive = [r for r in self.alive if r() is not None]
            self.max_alive = max(self.max_alive, len(self.alive))
            f = self.frame(i)
            self.alive.append(weakref.ref(f))
            yield f


@pytest.mark.parametrize("full_res", [False, True])
def test_pipeline_never_materialises_the_source(models, full_res):
    """The pipeline reads a lazy source as a stream (once; twice with --full-res), keeps at most a couple of
    source frames alive at any time, and hands every output frame to the sink (in frame order: see
    test_streaming_path_equals_array_path). A pipeline that stacks the source frames fails the count."""
    unet, vae = models
    n = 20
    src = CountingSource(n)
    op = Outpainter(unet, vae, OutpaintConfig(ratio="1:1", output_size=64, steps=2, full_res=full_res))
    got = []
    res = op(src, 24.0, sink=got.append)
    assert src.passes == (2 if full_res else 1)
    assert src.max_alive <= 2, f"{src.max_alive} source frames alive at once"
    assert len(got) == n and res.shape == (n, *got[0].shape) and res.frames is None
    g = res.geometry
    assert got[0].shape == ((g.full_h, g.full_w, 3) if full_res else (g.out_h, g.out_w, 3))
