"""``guidance=3``: the two-factor guidance rows the sampler uses (uu, cu, cc), without the unused uc row.

Its eps must equal rows 0, 1, 3 of ``guidance=4`` (eval mode, the shipped tiny U-Net).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3ddm_jax.assets import TINY_UNET
from m3ddm_jax.errors import ConfigError
from m3ddm_jax.interop.unet import load_unet


def test_guidance3_equals_rows_0_1_3_of_guidance4():
    """Per sample, guidance=3's rows (uu, cu, cc) equal guidance=4's rows 0, 1, 3 (eval mode, fp32).

    Both calls have 12 rows (guidance 3 x 4 samples, guidance 4 x 3 samples) so that XLA runs the same
    kernels: with different row counts (3 vs 4) CPU convolutions round differently (measured: 1.0e-6 at
    |eps| 2.2, a few ulp), which is not what this test is about."""
    model = load_unet(TINY_UNET)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(3)
    f, h, w, g = 4, 8, 8, 3
    uu, cu = (jnp.asarray(rng.standard_normal((4, f, h, w, 9)).astype(np.float32)) for _ in range(2))
    glat = jnp.asarray(rng.standard_normal((4 * g, 8, 8, 4)).astype(np.float32))
    t, fps = jnp.array([501, 20, 999, 300]), jnp.array([8, 3, 30, 12])

    @jax.jit
    def run(state, uu, cu, glat, t, fps):
        m = nnx.merge(graphdef, state)
        e3 = m(jnp.concatenate([uu, cu, cu]), t, glat, fps, guidance=3)
        e4 = m(jnp.concatenate([uu[:3], cu[:3], uu[:3], cu[:3]]), t[:3], glat[:3 * g], fps[:3], guidance=4)
        return e3, e4, m.global_context(glat[:g], 1, 3), m.global_context(glat[:g], 1, 4)

    e3, e4, ctx3, ctx4 = map(np.asarray, run(state, uu, cu, glat, t, fps))
    assert e3.shape == (12, f, h, w, 4) and e4.shape == (12, f, h, w, 4)
    np.testing.assert_array_equal(ctx3, ctx4[[0, 1, 3]])
    e3 = e3.reshape(3, 4, f, h, w, 4)[:, :3]  # (row kind, sample, ...)
    e4 = e4.reshape(4, 3, f, h, w, 4)
    np.testing.assert_allclose(e3, e4[[0, 1, 3]], rtol=0, atol=1e-6)
    # the three rows really differ (a mix-up of rows or contexts would show)
    assert np.abs(e3[0] - e3[1]).max() > 1e-2 and np.abs(e3[1] - e3[2]).max() > 1e-2


def test_guidance3_needs_a_multiple_of_three_rows():
    model = load_unet(TINY_UNET)
    with pytest.raises(ValueError, match="multiple of guidance 3"):
        nnx.eval_shape(lambda m: m(jnp.zeros((4, 4, 8, 8, 9)), 1, jnp.zeros((3, 8, 8, 4)), 1, guidance=3), model)
    with pytest.raises(ConfigError, match="guidance"):
        nnx.eval_shape(lambda m: m(jnp.zeros((5, 4, 8, 8, 9)), 1, jnp.zeros((3, 8, 8, 4)), 1, guidance=5), model)
