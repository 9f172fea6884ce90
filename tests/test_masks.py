"""Training masks (M3DDM+ uniform, M3DDM per-frame, frame cases): structure, statistics, determinism."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3ddm_jax import masks as M
from m3ddm_jax.errors import ConfigError

N_DRAWS = 10_000


def _z_ok(count: int, n: int, p: float, z: float = 4.5) -> bool:
    """``count`` of ``n`` Bernoulli(p) draws lies within ``z`` standard deviations of ``n p``."""
    sd = np.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= z * max(sd, 1e-9)


def _ks_uniform(x: np.ndarray, lo: float, hi: float) -> float:
    """Kolmogorov-Smirnov statistic of ``x`` against U[lo, hi]."""
    x = np.sort((np.asarray(x, np.float64) - lo) / (hi - lo))
    n = len(x)
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - x), np.max(x - (i - 1) / n)))


KS_CRIT = 1.95 / np.sqrt(N_DRAWS)  # alpha = 0.001


@functools.lru_cache(maxsize=None)
def _keys(seed: int = 0):
    return jax.random.split(jax.random.key(seed), N_DRAWS)


def test_uniform_same_across_frames_per_frame_not():
    keys = jax.random.split(jax.random.key(1), 16)
    um = jax.jit(jax.vmap(lambda k: M.uniform_mask(k, 8, 32, 48)))(keys)
    assert um.shape == (16, 8, 32, 48)
    assert bool(jnp.all(um == um[:, :1])), "uniform masks must be identical over the frames of a clip"
    assert float(um.mean()) > 0.05
    pm = jax.jit(jax.vmap(lambda k: M.per_frame_mask(k, 8, 32, 48)))(keys)
    differs = np.asarray(jnp.any(pm != pm[:, :1], axis=(1, 2, 3)))
    assert differs.all(), "per-frame masks must differ between the frames of a clip"
    # training_mask with frame cases: a uniform clip's masked frames are all the same mask
    tm = jax.jit(jax.vmap(lambda k: M.training_mask(k, 8, 32, 48, mode="uniform")))(keys)
    for clip in np.asarray(tm):
        masked = [f for f in clip if f.any()]
        assert all(np.array_equal(f, masked[0]) for f in masked)


def test_same_key_same_mask():
    k = jax.random.key(7)
    for mode in ("uniform", "per_frame"):
        f = jax.jit(functools.partial(M.training_mask, num_frames=6, height=24, width=40, mode=mode))
        a, b = f(k), f(k)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        c = f(jax.random.key(8))
        assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("preset", ["paper", "code"])
def test_uniform_statistics(preset):
    probs = M.UNIFORM_PRESETS[preset]
    lo, hi = M.WIDTH_RANGE
    h, w = 64, 96
    keys = _keys(0)
    strategy, sides, ratio = jax.jit(jax.vmap(lambda k: M.sample_uniform_params(k, probs)))(keys)
    strategy, sides, ratio = np.asarray(strategy), np.asarray(sides), np.asarray(ratio)
    for i, p in enumerate(probs):
        assert _z_ok(int((strategy == i).sum()), N_DRAWS, p), (preset, M.UNIFORM_STRATEGIES[i])
    # sides match the strategy
    n_sides = sides.sum(1)
    assert np.array_equal(n_sides, np.array([4, 2, 1])[strategy])
    two = sides[strategy == 1]
    horiz = (two[:, 0] & two[:, 1]).sum()
    assert (two[:, 0] == two[:, 1]).all() and (two[:, 2] == two[:, 3]).all()
    assert _z_ok(int(horiz), len(two), 0.5)
    one = sides[strategy == 2]
    for s in range(4):
        assert _z_ok(int(one[:, s].sum()), len(one), 0.25)
    # width ratio ~ U[lo, hi]
    assert ratio.min() >= lo and ratio.max() <= hi
    assert _ks_uniform(ratio, lo, hi) < KS_CRIT
    # the pixel masks realise int(size * r / 2) per side
    masks = np.asarray(jax.jit(jax.vmap(lambda k: M.uniform_mask(k, 1, h, w, probs)[0]))(keys[:500]))
    for m, sd, r in zip(masks, sides[:500], ratio[:500]):
        dw, dh = int(w * r / 2), int(h * r / 2)
        mid_row, mid_col = m[h // 2], m[:, w // 2]
        assert mid_row[:w // 2].sum() == (dw if sd[0] else 0)
        assert mid_row[w // 2:].sum() == (dw if sd[1] else 0)
        assert mid_col[:h // 2].sum() == (dh if sd[2] else 0)
        assert mid_col[h // 2:].sum() == (dh if sd[3] else 0)


def test_per_frame_statistics():
    lo, hi = M.WIDTH_RANGE
    keys = _keys(1)
    strategy, sides, ratios = jax.jit(jax.vmap(lambda k: M.sample_per_frame_params(k)))(keys)
    strategy, sides, ratios = np.asarray(strategy), np.asarray(sides), np.asarray(ratios)
    for i, p in enumerate(M.PER_FRAME_PROBS):
        assert _z_ok(int((strategy == i).sum()), N_DRAWS, p), M.PER_FRAME_STRATEGIES[i]
    sided = strategy < 4
    r = ratios[sided & (strategy != 3)][:, 0]
    assert r.min() >= lo and r.max() <= hi and _ks_uniform(r, lo, hi) < KS_CRIT
    rr = ratios[strategy == 3].reshape(-1)
    assert _ks_uniform(rr, lo, hi) < KS_CRIT * np.sqrt(N_DRAWS / len(rr))
    assert (sides[strategy == 3].sum(1) >= 1).all()
    # full-frame strategy masks everything
    full_key = keys[int(np.argmax(strategy == 4))]
    m = M.sides_mask(16, 16, *M.sample_per_frame_params(full_key)[1:])
    assert float(m.min()) == 1.0


def test_frame_case_statistics():
    keys = _keys(2)
    f = 8
    case, revealed = jax.jit(jax.vmap(lambda k: M.sample_frame_case(k, f)))(keys)
    case, revealed = np.asarray(case), np.asarray(revealed)
    for i, p in enumerate(M.FRAME_CASE_PROBS):
        assert _z_ok(int((case == i).sum()), N_DRAWS, p), M.FRAME_CASES[i]
    assert not revealed[case == 0].any()
    ends = revealed[case == 1]
    assert ends[:, [0, -1]].all() and not ends[:, 1:-1].any()
    rnd = revealed[case == 2]
    assert _z_ok(int(rnd.sum()), rnd.size, 0.5)
    # configurable probabilities
    case2, _ = jax.vmap(lambda k: M.sample_frame_case(k, f, (1.0, 0.0, 0.0)))(keys[:100])
    assert (np.asarray(case2) == 0).all()


def test_bad_probabilities_raise():
    with pytest.raises(ConfigError):
        M.uniform_mask(jax.random.key(0), 2, 8, 8, probs=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError):
        M.training_mask(jax.random.key(0), 2, 8, 8, mode="nope")


def test_latent_mask_top_left():
    m = jnp.zeros((2, 16, 16)).at[:, :, 1:9].set(1.0)  # columns 1..8: cell 0's top-left is known, cell 1's masked
    lm = M.latent_mask(m, 8)
    assert lm.shape == (2, 2, 2)
    assert np.array_equal(np.asarray(lm[0]), np.array([[0, 1], [0, 1]]))
