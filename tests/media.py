"""Test inputs and harnesses shared by the test files: real encoded media (PyAV) and infer.py run in-process.

* :func:`encode` writes RGB frames as a real video file (any FFmpeg encoder PyAV has: lossless H.264 by
  default), with an optional :class:`Tone` audio track, a display rotation, or irregular timestamps;
* :func:`audio_only` writes a file with a tone and no video stream;
* :func:`infer_in_process` runs ``infer.py``'s ``main`` in this process with the models loaded once and one
  ``Outpainter`` per setting, so that every run of a test module shares one compile of the sampler.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Tone:
    """A sine tone per channel (``hz``, then ``hz + 110`` for the second channel), float planar frames of 1024
    samples; ``seconds`` None = as long as the video."""
    layout: str = "mono"
    codec: str = "aac"
    rate: int = 16000
    hz: float = 330.0
    seconds: float | None = None


def _add_tone(out, tone: Tone, seconds: float) -> None:
    a = out.add_stream(tone.codec, rate=tone.rate, layout=tone.layout)
    t = np.arange(int(tone.rate * seconds)) / tone.rate
    channels = 1 if tone.layout == "mono" else 2
    wave = np.stack([0.2 * np.sin(2 * np.pi * (tone.hz + 110 * c) * t) for c in range(channels)]).astype(np.float32)
    return a, wave


def _mux_tone(out, a, wave: np.ndarray, tone: Tone) -> None:
    import av

    for k in range(0, wave.shape[1], 1024):
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, k:k + 1024]), format="fltp", layout=tone.layout)
        af.sample_rate, af.pts = tone.rate, k
        for p in a.encode(af):
            out.mux(p)
    for p in a.encode():
        out.mux(p)


def encode(path: Path, frames: np.ndarray, fps: int = 24, codec: str = "libx264rgb", pix_fmt: str | None = None,
           options: dict | None = None, rotation: int | None = None, pts_ms: list[int] | None = None,
           fmt: str | None = None, tone: Tone | None = None) -> Path:
    """Encode RGB frames ``(N, H, W, 3)`` into ``path``. ``pix_fmt`` defaults to rgb24 for libx264rgb and
    yuv420p otherwise; ``options`` default to crf 0 (lossless) for the libx264 encoders; ``rotation`` sets the
    display matrix (degrees counter-clockwise, as FFmpeg reads it back); ``pts_ms`` gives irregular timestamps
    in milliseconds (variable frame rate); ``tone`` adds an audio track."""
    import av

    if pix_fmt is None:
        pix_fmt = "rgb24" if codec == "libx264rgb" else "yuv420p"
    with av.open(str(path), "w", format=fmt) as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        vs.options = options if options is not None else ({"crf": "0"} if codec.startswith("libx264") else {})
        if pts_ms is not None:
            vs.codec_context.time_base = Fraction(1, 1000)
            vs.time_base = Fraction(1, 1000)
        if rotation is not None:
            vs.set_display_rotation(rotation)
        audio = _add_tone(out, tone, tone.seconds or len(frames) / fps) if tone is not None else None
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            if pts_ms is not None:
                vf.pts, vf.time_base = pts_ms[i], Fraction(1, 1000)
            else:
                vf.pts = i
            for p in vs.encode(vf):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        if audio is not None:
            _mux_tone(out, *audio, tone)
    return path


def audio_only(path: Path, tone: Tone = Tone(hz=440.0, seconds=1.0)) -> Path:
    """An audio file with no video stream."""
    import av

    with av.open(str(path), "w") as out:
        _mux_tone(out, *_add_tone(out, tone, tone.seconds or 1.0), tone)
    return path


@contextlib.contextmanager
def infer_in_process(name: str, wrap_outpainter: Callable | None = None):
    """Yields ``run(*args) -> (rc, stdout, stderr)`` of infer.py's ``main`` in this process. Models are loaded
    once per argument set (``run.loads`` counts the loads asked for: 0 for a run refused before any compute)
    and one Outpainter is made per (U-Net, setting) (``run.outpainters``); ``wrap_outpainter(op)`` may
    instrument each new one."""
    import m3ddm_jax.outpaint.pipeline as pipeline
    import m3ddm_jax.weights as weights

    spec = importlib.util.spec_from_file_location(name, REPO / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    real_load, real_outpainter = weights.load_models, pipeline.Outpainter
    models, outpainters = {}, {}

    def load_models(*a, **k):
        run.loads += 1
        key = repr((a, sorted(k.items())))
        if key not in models:
            models[key] = real_load(*a, **k)
        return models[key]

    def outpainter(unet, vae, cfg, *a, **k):
        key = (id(unet), repr(cfg))
        if key not in outpainters:
            op = real_outpainter(unet, vae, cfg, *a, **k)
            outpainters[key] = wrap_outpainter(op) if wrap_outpainter is not None else op
        return outpainters[key]

    def run(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = infer.main([str(a) for a in args])
        return rc, out.getvalue(), err.getvalue()

    run.loads, run.outpainters = 0, outpainters
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "load_models", load_models)
        mp.setattr(pipeline, "Outpainter", outpainter)
        yield run
