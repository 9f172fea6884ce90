"""The ``"flash"`` attention implementation: the Pallas TPU kernel (run here in Pallas' TPU interpret mode)
and its XLA fallback off TPU equal the ``"xla"`` attention."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from m3ddm_jax.models import attention as A


def _qkv(b, lq, lk, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in
                 ((b, lq, h * d), (b, lk, h * d), (b, lk, h * d)))


@pytest.mark.parametrize("b,lq,lk,h,d", [(2, 256, 200, 2, 40),   # keys padded 200 -> 256, masked
                                         (1, 640, 600, 1, 128)])  # 512-blocks: queries and keys padded
def test_flash_kernel_matches_xla(b, lq, lk, h, d):
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = _qkv(b, lq, lk, h, d)
    ref = np.asarray(A.attention(q, k, v, h))
    assert A.flash_applies(lq, lk, d)
    with pltpu.force_tpu_interpret_mode():
        out = A._flash_tpu(*(A._split_heads(x, h) for x in (q, k, v)))
    out = np.asarray(out).reshape(b, lq, h * d)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_flash_off_tpu_is_the_chunked_xla_path():
    q, k, v = _qkv(2, 300, 150, 4, 16, seed=1)
    ref = np.asarray(A.attention(q, k, v, 4))
    np.testing.assert_array_equal(np.asarray(A.attention(q, k, v, 4, impl="flash")), ref)
    chunked = np.asarray(A.attention(q, k, v, 4, impl="flash", query_chunk=64))
    np.testing.assert_allclose(chunked, ref, rtol=0, atol=1e-6)
    # shapes the kernel does not tile go to the XLA path on every platform
    assert not A.flash_applies(16, 16, 40) and not A.flash_applies(1024, 1024, 160)
    assert A.flash_applies(1024, 3136, 40)
