"""The sample clip README's first command outpaints (examples/sample_9x16.mp4) and its generator.

The clip is committed so that a fresh clone can run ``python infer.py examples/sample_9x16.mp4 ...``;
``examples/make_sample_clip.py`` regenerates it. x264 output is not promised to be bit-identical across
library builds, so regeneration is checked on the decoded frames (same count, size and rate; pixels within
a small tolerance), not on the file's bytes.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from m3ddm_jax.outpaint.windows import plan_windows
from m3ddm_jax.video import read_video

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "examples" / "sample_9x16.mp4"
SCRIPT = REPO / "examples" / "make_sample_clip.py"
NUM_FRAMES, WIDTH, HEIGHT, FPS = 69, 360, 640, 24


@pytest.fixture(scope="module")
def clip():
    return read_video(CLIP)


def test_sample_clip_is_9x16_with_expected_frames(clip):
    assert clip.frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert clip.frames.dtype == np.uint8
    assert HEIGHT * 9 == WIDTH * 16  # portrait 9:16
    assert clip.fps == FPS
    # small enough to ship: a few hundred KB at most
    assert CLIP.stat().st_size < 400 * 1024
    # the default strides run their full coarse-to-fine schedule on it: 15, 5, then 1
    windows = plan_windows(clip.num_frames, fps=clip.fps)
    assert [w.stride for w in windows] == [15, 5, 1, 1, 1, 1, 1]


def test_sample_clip_is_a_moving_scene(clip):
    f = clip.frames.astype(np.float32)
    # not a still: consecutive frames differ (pan, clouds, car), and the picture is not flat
    assert np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3)).min() > 0.3
    assert np.abs(f[-1] - f[0]).mean() > 3.0
    assert f[0].std() > 20.0
    # content reaches both side edges (what outpainting extends): the edge columns are not uniform
    for col in (f[:, :, :4], f[:, :, -4:]):
        assert col.std() > 10.0


def test_sample_clip_has_audio(clip):
    with av.open(str(CLIP)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
        stream = c.streams.audio[0]
        assert stream.codec_context.name == "aac"
        rate = stream.rate
        samples = np.concatenate([fr.to_ndarray() for fr in c.decode(stream)], axis=1)  # planar (channels, n)
    duration = NUM_FRAMES / FPS
    assert abs(samples.shape[1] / rate - duration) < 0.1  # covers the video (AAC adds a frame of priming)
    peak = np.abs(samples).max()
    assert 0.05 < peak < 1.0  # audible, not clipped


def test_generator_reproduces_the_clip(tmp_path, clip):
    out = tmp_path / "regen.mp4"
    subprocess.run([sys.executable, str(SCRIPT), "--output", str(out)], check=True, capture_output=True, timeout=600)
    regen = read_video(out)
    assert regen.frames.shape == clip.frames.shape
    assert regen.fps == clip.fps
    diff = np.abs(regen.frames.astype(np.int16) - clip.frames.astype(np.int16))
    assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 16, (diff.mean(), diff.max())
    with av.open(str(out)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
