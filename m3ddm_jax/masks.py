"""Outpainting masks: one module for training, evaluation and inference (1 = to generate, 0 = known).

Evaluation crops (spec section 7.2): ``crop_ratio`` is the total fraction of the target width (horizontal)
or height (vertical) that is outpainted, half per side: on a 256x144 target 0.25 keeps the centre 192x144
(32 px cut per side) and 0.66 keeps 88x144 (84 px per side). :func:`eval_keep_box` gives the kept box,
:func:`eval_pixel_mask` the corresponding pixel mask. Training mask strategies (M3DDM+ uniform, M3DDM
per-frame) are pure functions of a PRNG key, added below by the training code.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
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


# ---------------------------------------------------------------------------------------------------------
# Training masks (spec section 6.4 and the M3DDM+ paper section 3.2): pure functions of a PRNG key, jittable
# and vmappable. Pixel masks are float32 ``(F, H, W)`` with 1 = to generate, 0 = known.
#
# A side's strip is ``int(size * ratio / 2)`` pixels wide (``size`` = the frame's width for left/right,
# its height for top/bottom): ratio 1.0 reaches from the border to the centre, so a one-sided mask covers
# ``ratio / 2`` of the frame and a two-sided one ``ratio`` in total (spec 6.4).
# ---------------------------------------------------------------------------------------------------------

#: Side order of the boolean ``sides`` vectors below.
SIDES = ("left", "right", "top", "bottom")

#: M3DDM+ uniform strategies, in the order of the probability tuples.
UNIFORM_STRATEGIES = ("four", "two", "one")
#: The paper's probabilities (four-sided 0.30, two-sided 0.55, one-sided 0.15).
UNIFORM_PROBS_PAPER = (0.30, 0.55, 0.15)
#: The reference code's probabilities (four 0.15, bi 0.55, single 0.30; train_model.py).
UNIFORM_PROBS_CODE = (0.15, 0.55, 0.30)
UNIFORM_PRESETS = {"paper": UNIFORM_PROBS_PAPER, "code": UNIFORM_PROBS_CODE}

#: M3DDM per-frame strategies (paper section 3.2), in the order of the probability tuple.
PER_FRAME_STRATEGIES = ("four", "two", "one", "random", "full")
PER_FRAME_PROBS = (0.2, 0.1, 0.35, 0.1, 0.25)

#: Frame cases (spec 6.4): all frames masked / first and last revealed / each revealed with ``p_frame``.
FRAME_CASES = ("all", "ends", "random")
FRAME_CASE_PROBS = (0.30, 0.35, 0.35)

WIDTH_RANGE = (0.15, 0.75)


def _check_probs(probs, n: int, what: str) -> tuple[float, ...]:
    probs = tuple(float(p) for p in probs)
    if len(probs) != n or any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ConfigError(f"{what}: need {n} non-negative probabilities summing to 1, got {probs}")
    return probs


def _check_range(width_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in width_range)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"mask width range must satisfy 0 <= lo <= hi <= 1, got {(lo, hi)}")
    return lo, hi


def sides_mask(height: int, width: int, sides: jax.Array, ratios: jax.Array) -> jax.Array:
    """float32 ``(height, width)`` mask of border strips.

    ``sides``: bool ``(4,)`` (left, right, top, bottom); ``ratios``: scalar or ``(4,)`` per-side width ratios.
    Side ``s`` covers ``int(size * ratio_s / 2)`` pixels from its border.
    """
    ratios = jnp.broadcast_to(jnp.asarray(ratios, jnp.float32), (4,))
    sizes = jnp.array([width, width, height, height], jnp.float32)
    d = jnp.floor(sizes * ratios / 2).astype(jnp.int32)  # int() of a positive float
    d = jnp.where(sides, d, 0)
    cols = jnp.arange(width)[None, :]
    rows = jnp.arange(height)[:, None]
    m = (cols < d[0]) | (cols >= width - d[1]) | (rows < d[2]) | (rows >= height - d[3])
    return m.astype(jnp.float32)


def _one_side(key) -> jax.Array:
    return jax.nn.one_hot(jax.random.randint(key, (), 0, 4), 4, dtype=jnp.bool_)


def _two_sides(key) -> jax.Array:
    horizontal = jax.random.bernoulli(key)  # left+right, else top+bottom (50/50)
    return jnp.where(horizontal, jnp.array([True, True, False, False]), jnp.array([False, False, True, True]))


def sample_uniform_params(key: jax.Array, probs=UNIFORM_PROBS_PAPER, width_range=WIDTH_RANGE):
    """One M3DDM+ draw: ``(strategy index into UNIFORM_STRATEGIES, sides bool (4,), ratio)``."""
    probs = _check_probs(probs, 3, "uniform mask probabilities")
    lo, hi = _check_range(width_range)
    ks, kd, kr = jax.random.split(key, 3)
    strategy = jax.random.choice(ks, 3, p=jnp.asarray(probs, jnp.float32))
    k1, k2 = jax.random.split(kd)
    sides = jnp.stack([jnp.ones(4, jnp.bool_), _two_sides(k1), _one_side(k2)])[strategy]
    ratio = jax.random.uniform(kr, (), jnp.float32, lo, hi)
    return strategy, sides, ratio


def uniform_mask(key: jax.Array, num_frames: int, height: int, width: int, probs=UNIFORM_PROBS_PAPER,
                 width_range=WIDTH_RANGE) -> jax.Array:
    """M3DDM+ mask ``(num_frames, height, width)``: one direction set and one width for every frame."""
    _, sides, ratio = sample_uniform_params(key, probs, width_range)
    return jnp.broadcast_to(sides_mask(height, width, sides, ratio), (num_frames, height, width))


def sample_per_frame_params(key: jax.Array, probs=PER_FRAME_PROBS, width_range=WIDTH_RANGE):
    """One M3DDM per-frame draw: ``(strategy index into PER_FRAME_STRATEGIES, sides (4,), ratios (4,))``.

    "random" (not specified further by the paper) masks a random non-empty subset of the four sides, each
    side with its own width; "full" masks the whole frame (sides all set, ratios 2.0).
    """
    probs = _check_probs(probs, 5, "per-frame mask probabilities")
    lo, hi = _check_range(width_range)
    ks, k1, k2, k3, kr, kr4 = jax.random.split(key, 6)
    strategy = jax.random.choice(ks, 5, p=jnp.asarray(probs, jnp.float32))
    subset = jax.random.bernoulli(k3, 0.5, (4,))
    subset = jnp.where(subset.any(), subset, _one_side(k3))
    all4 = jnp.ones(4, jnp.bool_)
    sides = jnp.stack([all4, _two_sides(k1), _one_side(k2), subset, all4])[strategy]
    ratio = jax.random.uniform(kr, (), jnp.float32, lo, hi)
    per_side = jax.random.uniform(kr4, (4,), jnp.float32, lo, hi)
    ratios = jnp.where(strategy == 3, per_side, jnp.full((4,), ratio))
    ratios = jnp.where(strategy == 4, 2.0, ratios)
    return strategy, sides, ratios


def per_frame_mask(key: jax.Array, num_frames: int, height: int, width: int, probs=PER_FRAME_PROBS,
                   width_range=WIDTH_RANGE) -> jax.Array:
    """M3DDM mask ``(num_frames, height, width)``: every frame draws its own strategy and width."""
    keys = jax.random.split(key, num_frames)

    def one(k):
        _, sides, ratios = sample_per_frame_params(k, probs, width_range)
        return sides_mask(height, width, sides, ratios)

    return jax.vmap(one)(keys)


def sample_frame_case(key: jax.Array, num_frames: int, probs=FRAME_CASE_PROBS, p_frame: float = 0.5):
    """``(case index into FRAME_CASES, revealed bool (num_frames,))``: revealed frames are fully known."""
    probs = _check_probs(probs, 3, "frame case probabilities")
    kc, kf = jax.random.split(key)
    case = jax.random.choice(kc, 3, p=jnp.asarray(probs, jnp.float32))
    ends = jnp.zeros(num_frames, jnp.bool_).at[0].set(True).at[-1].set(True)
    rand = jax.random.bernoulli(kf, p_frame, (num_frames,))
    revealed = jnp.stack([jnp.zeros(num_frames, jnp.bool_), ends, rand])[case]
    return case, revealed


def training_mask(key: jax.Array, num_frames: int, height: int, width: int, *, mode: str = "uniform",
                  probs=None, width_range=WIDTH_RANGE, frame_case_probs=FRAME_CASE_PROBS,
                  p_frame: float = 0.5) -> jax.Array:
    """The training mask of one clip ``(num_frames, height, width)``: spatial mask (``mode`` "uniform" =
    M3DDM+, "per_frame" = M3DDM) with the frame cases applied (revealed frames all 0)."""
    ks, kc = jax.random.split(key)
    if mode == "uniform":
        m = uniform_mask(ks, num_frames, height, width, probs or UNIFORM_PROBS_PAPER, width_range)
    elif mode == "per_frame":
        m = per_frame_mask(ks, num_frames, height, width, probs or PER_FRAME_PROBS, width_range)
    else:
        raise ConfigError(f"mask mode must be 'uniform' or 'per_frame', got {mode!r}")
    _, revealed = sample_frame_case(kc, num_frames, frame_case_probs, p_frame)
    return jnp.where(revealed[:, None, None], 0.0, m)


def latent_mask(pixel_mask: jax.Array, factor: int = 8) -> jax.Array:
    """Pixel mask ``(..., H, W)`` -> latent mask ``(..., H/f, W/f)`` by the top-left pixel of each cell
    (PyTorch ``nearest``, spec 9.23 - the same rule as inference)."""
    return pixel_mask[..., ::factor, ::factor]
