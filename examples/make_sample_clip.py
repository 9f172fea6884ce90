#!/usr/bin/env python
"""Generate ``examples/sample_9x16.mp4``: the small sample clip README's first command outpaints.

    python examples/make_sample_clip.py [--output examples/sample_9x16.mp4]

A procedurally drawn 9:16 portrait landscape (360x640, 24 fps, 69 frames = 2.875 s; 69 frames is the mean
DAVIS sequence length and gives the default strides 15,5,1 their full coarse-to-fine schedule of 7 windows),
H.264 yuv420p, with a stereo AAC track (a soft A-major chord with an attack/release envelope).

The scene is drawn in world coordinates wider than the frame, so everything continues past the left and
right edges -- what outpainting has to extend: a sky gradient with a low sun, soft clouds drifting right,
three parallax layers (far mountains, middle hills with a tree line, near meadow with a road) under a slow
camera pan to the right, a red car driving left to right along the road and a hot-air balloon rising
slowly. Every random choice comes from one fixed seed; only numpy and PyAV are used, nothing is downloaded.
"""
from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT = 360, 640           # 9:16 portrait
FPS = 24
NUM_FRAMES = 69                    # 7 windows at strides 15,5,1
AUDIO_RATE = 44100
SEED = 20240609
CRF = 20                           # visually clean; the clip stays < 200 KB
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "sample_9x16.mp4"


def _smooth(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _cover(signed_dist):
    """Anti-aliased coverage of the region where ``signed_dist`` (in pixels) is positive."""
    return np.clip(signed_dist + 0.5, 0.0, 1.0)


def _over(img, color, alpha):
    """Composite a flat ``color`` (3,) with per-pixel ``alpha`` (H, W) onto ``img`` (H, W, 3) in place."""
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(color, np.float32)


class Scene:
    """All random parameters of the scene, drawn once from ``seed``."""

    def __init__(self, seed: int = SEED):
        rng = np.random.default_rng(seed)
        # ridge lines: sums of sines in world x (period-free, so they continue beyond any edge)
        self.ridges = {name: (np.geomspace(0.005, 0.06, n) * rng.uniform(0.8, 1.25, n), rng.uniform(0, 2 * np.pi, n),
                                 amp * rng.uniform(0.5, 1.0, n) / np.sqrt(np.arange(1, n + 1)))
                       for name, n, amp in (("far", 7, 44.0), ("mid", 5, 20.0), ("near", 4, 8.0))}
        # clouds: clusters of soft gaussian puffs in world x (spread over +-600 px around the frame)
        self.clouds = []
        for cx in np.linspace(-620, 980, 9) + rng.uniform(-60, 60, 9):
            cy = rng.uniform(50, 230)
            n = rng.integers(6, 11)
            puffs = np.stack([cx + rng.normal(0, 30, n), cy + rng.normal(0, 8, n) - rng.uniform(0, 10, n), rng.uniform(12, 28, n)], 1)
            self.clouds.append((puffs, rng.uniform(0.55, 0.85)))
        # trees on the middle hills (world x, height)
        self.trees = np.stack([np.sort(rng.uniform(-700, 1100, 70)), rng.uniform(14, 30, 70)], 1)
        # grass texture for the near meadow: fixed noise, tiled in world x
        self.grass = rng.normal(0, 1, (HEIGHT, 2048)).astype(np.float32)

    def ridge(self, name, wx, base):
        f, ph, amp = self.ridges[name]
        return base - (amp[None, :] * np.sin(wx[:, None] * f[None, :] + ph[None, :])).sum(1)

    def frame(self, i: int) -> np.ndarray:
        t = i / FPS
        pan = 30.0 * t                      # camera pan to the right: the near layer moves 30 px/s
        x = np.arange(WIDTH, dtype=np.float32) + 0.5
        y = (np.arange(HEIGHT, dtype=np.float32) + 0.5)[:, None]

        # sky: vertical gradient, warmer near the horizon, plus a sun glow
        v = y / HEIGHT
        sky = np.array([0.23, 0.45, 0.82], np.float32) * (1 - v) + np.array([0.93, 0.80, 0.66], np.float32) * v
        img = np.broadcast_to(sky[:, None, :] if sky.ndim == 2 else sky, (HEIGHT, WIDTH, 3)).astype(np.float32).copy()
        sun_x, sun_y = 250.0 - 0.3 * pan, 300.0
        d = np.sqrt((x[None, :] - sun_x) ** 2 + (y - sun_y) ** 2)
        _over(img, (1.0, 0.93, 0.75), 0.55 * np.exp(-(d / 90.0) ** 2))
        _over(img, (1.0, 0.97, 0.88), _cover(22.0 - d))

        # clouds: drift right with the wind, move against the pan at 0.3x depth; lit tops, greyer bases
        for puffs, opacity in self.clouds:
            cx = puffs[:, 0] + 20.0 * t - 0.3 * pan
            x0 = int(max(0, np.floor((cx - 3 * puffs[:, 2]).min())))
            x1 = int(min(WIDTH, np.ceil((cx + 3 * puffs[:, 2]).max())))
            y0 = int(max(0, np.floor((puffs[:, 1] - 2 * puffs[:, 2]).min())))
            y1 = int(min(HEIGHT, np.ceil((puffs[:, 1] + 2 * puffs[:, 2]).max())))
            if x1 <= x0:
                continue
            xs, ys = x[x0:x1][None, :], y[y0:y1]
            dens = np.zeros((y1 - y0, x1 - x0), np.float32)
            for (_, py, r), ox in zip(puffs, cx):
                dens += np.exp(-(((xs - ox) ** 2) + ((ys - py) * 1.8) ** 2) / (2 * r * r))
            alpha = opacity * _smooth(0.15, 0.8, dens)
            base = _smooth(puffs[:, 1].mean() - 20.0, puffs[:, 1].mean() + 25.0, ys)      # (h, 1)
            col = np.array([1.0, 0.99, 0.97], np.float32) * (1 - 0.22 * base[..., None]) + np.array([0.05, 0.05, 0.1], np.float32) * base[..., None]
            a = alpha[..., None]
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + a * col

        # far mountains (0.4x parallax), bluish, with haze towards the base
        wx = x + 0.4 * pan
        top = self.ridge("far", wx, 360.0)
        cov = _cover(y - top[None, :])
        haze = _smooth(top[None, :], 470.0, y)
        col = np.array([0.42, 0.50, 0.68], np.float32) * (1 - haze[..., None]) + np.array([0.70, 0.72, 0.80], np.float32) * haze[..., None]
        img = img * (1 - cov[..., None]) + cov[..., None] * col

        # hot-air balloon between the mountains and the camera (0.6x parallax), rising slowly
        bx, by = 95.0 - 0.6 * pan + 3.0 * t, 250.0 - 7.0 * t
        e = np.sqrt(((x[None, :] - bx) / 26.0) ** 2 + ((y - by) / 32.0) ** 2)
        stripes = (np.floor((x[None, :] - bx) / 9.0) % 2).astype(np.float32)
        env_col = np.array([0.86, 0.22, 0.18], np.float32) * (1 - stripes[..., None]) + np.array([0.98, 0.80, 0.20], np.float32) * stripes[..., None]
        a = _cover((1.0 - e) * 26.0)
        img = img * (1 - a[..., None]) + a[..., None] * env_col
        _over(img, (0.40, 0.26, 0.14), _cover(5.0 - np.abs(x[None, :] - bx)) * _cover(5.0 - np.abs(y - (by + 44.0))))
        for s in (-1, 1):  # ropes from envelope to basket
            rx = bx + s * (14.0 - 10.0 * np.clip((y - (by + 26)) / 14.0, 0, 1))
            _over(img, (0.25, 0.2, 0.15), 0.8 * _cover(0.7 - np.abs(x[None, :] - rx)) * ((y > by + 26) & (y < by + 40)))

        # middle hills (0.7x parallax) with a tree line along the crest
        wx = x + 0.7 * pan
        top = self.ridge("mid", wx, 455.0)
        cov = _cover(y - top[None, :])
        shade = _smooth(top[None, :], top[None, :] + 120.0, y)[..., None]
        col = np.array([0.30, 0.52, 0.28], np.float32) * (1 - shade) + np.array([0.20, 0.38, 0.22], np.float32) * shade
        img = img * (1 - cov[..., None]) + cov[..., None] * col
        for tx, th in self.trees:
            sx = tx - 0.7 * pan
            hw = th / 3.2
            if sx + hw < 0 or sx - hw > WIDTH:
                continue
            base = float(self.ridge("mid", np.array([tx], np.float32), 455.0)[0]) + 4.0
            # a conifer: a triangle of height th and half-width th/3.2 standing on the hill
            x0, x1 = max(0, int(sx - hw) - 1), min(WIDTH, int(sx + hw) + 2)
            y0, y1 = max(0, int(base - th) - 1), min(HEIGHT, int(base) + 2)
            h = (base - y[y0:y1]) / th
            inside = _cover(np.minimum(th * h, th * (1 - h))) * _cover((1 - h) * hw - np.abs(x[None, x0:x1] - sx))
            _over(img[y0:y1, x0:x1], (0.10, 0.26, 0.14), inside)

        # near meadow (1.0x parallax) with grass texture and a road
        wx = x + 1.0 * pan
        top = self.ridge("near", wx, 520.0)
        cov = _cover(y - top[None, :])
        gi = (np.round(wx).astype(np.int64)) % self.grass.shape[1]
        tex = self.grass[:, gi]
        depth = _smooth(top[None, :], float(HEIGHT), y)[..., None]
        col = np.array([0.45, 0.62, 0.25], np.float32) * (1 - depth) + np.array([0.32, 0.50, 0.18], np.float32) * depth
        col = col * (1.0 + 0.06 * tex[..., None])
        img = img * (1 - cov[..., None]) + cov[..., None] * col
        road_top, road_bot = 572.0, 598.0
        road = _cover(y - road_top) * _cover(road_bot - y) * np.ones((1, WIDTH), np.float32)
        _over(img, (0.36, 0.35, 0.34), road)
        dash = ((wx % 40.0) < 20.0).astype(np.float32)[None, :]
        _over(img, (0.95, 0.92, 0.70), dash * _cover(1.2 - np.abs(y - 585.0)))

        # a red car driving left to right along the road (enters and leaves the frame)
        cx = -70.0 + 200.0 * t - 1.0 * pan    # screen x of the car's rear end
        body = _cover(y - 566.0) * _cover(584.0 - y) * _cover(x[None, :] - cx) * _cover(cx + 62.0 - x[None, :])
        cabin = _cover(y - 553.0) * _cover(567.0 - y) * _cover(x[None, :] - (cx + 14.0)) * _cover(cx + 46.0 - x[None, :])
        _over(img, (0.80, 0.10, 0.10), np.maximum(body, cabin))
        window = _cover(y - 556.0) * _cover(565.0 - y) * _cover(x[None, :] - (cx + 18.0)) * _cover(cx + 42.0 - x[None, :])
        _over(img, (0.62, 0.78, 0.90), window)
        for wx0 in (cx + 13.0, cx + 49.0):
            dw = np.sqrt((x[None, :] - wx0) ** 2 + (y - 585.0) ** 2)
            _over(img, (0.08, 0.08, 0.08), _cover(7.0 - dw))
            _over(img, (0.6, 0.6, 0.6), _cover(3.0 - dw))

        # gentle vignette
        r = np.sqrt(((x[None, :] - WIDTH / 2) / WIDTH) ** 2 + ((y - HEIGHT / 2) / HEIGHT) ** 2)
        img *= (1.0 - 0.18 * r * r)[..., None]
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def audio(num_samples: int, rate: int = AUDIO_RATE, seed: int = SEED) -> np.ndarray:
    """A soft stereo A-major chord with a slow attack/release envelope: float32 ``(2, num_samples)``."""
    rng = np.random.default_rng(seed + 1)
    t = np.arange(num_samples) / rate
    dur = num_samples / rate
    env = _smooth(0.0, 0.35, t) * _smooth(dur, dur - 0.8, t)
    out = np.zeros((2, num_samples))
    for k, f0 in enumerate((220.0, 277.18, 329.63, 440.0)):
        ph = rng.uniform(0, 2 * np.pi, 2)
        pan = (0.35 + 0.1 * k, 0.75 - 0.1 * k)
        tone = np.sin(2 * np.pi * f0 * t[None, :] + ph[:, None]) + 0.25 * np.sin(4 * np.pi * f0 * t[None, :] + ph[:, None])
        out += np.array(pan)[:, None] * tone * (1.0 + 0.15 * np.sin(2 * np.pi * (0.7 + 0.3 * k) * t))[None, :]
    return (0.12 * env[None, :] * out).astype(np.float32)


def render(num_frames: int = NUM_FRAMES, seed: int = SEED) -> np.ndarray:
    scene = Scene(seed)
    return np.stack([scene.frame(i) for i in range(num_frames)])


def write(path: Path, frames: np.ndarray, fps: int = FPS, crf: int = CRF) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=Fraction(fps))
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv420p"
        # single-threaded x264 with fixed options: the output does not depend on the machine's core count
        vs.options = {"crf": str(crf), "preset": "slow", "threads": "1"}
        vs.bit_rate = 0
        layout = "stereo"
        as_ = out.add_stream("aac", rate=AUDIO_RATE, layout=layout)
        as_.bit_rate = 96_000
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = i
            for packet in vs.encode(vf):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        samples = audio(int(round(len(frames) / fps * AUDIO_RATE)))
        chunk = 1024
        for s in range(0, samples.shape[1], chunk):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, s:s + chunk]), format="fltp", layout=layout)
            af.sample_rate = AUDIO_RATE
            af.pts = s
            for packet in as_.encode(af):
                out.mux(packet)
        for packet in as_.encode():
            out.mux(packet)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the mp4 (default: %(default)s)")
    p.add_argument("--frames", type=int, default=NUM_FRAMES, help="number of frames (default: %(default)s)")
    p.add_argument("--png", type=Path, default=None, help="also write the middle frame as a PNG here")
    args = p.parse_args(argv)
    frames = render(args.frames)
    write(args.output, frames)
    if args.png is not None:
        import cv2  # noqa: PLC0415  (opencv is a dependency of m3ddm-jax)

        cv2.imwrite(str(args.png), frames[len(frames) // 2][:, :, ::-1])
    print(f"{args.output}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]} @ {FPS} fps, "
          f"{args.output.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
