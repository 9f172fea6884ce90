"""GroupNorm statistics stay accurate under jit for inputs with a large mean (e.g. a black frame)."""
from __future__ import annotations

import jax
import numpy as np
import torch

from m3ddm_jax.models.norms import group_norm


def test_group_norm_matches_torch_and_float64_under_jit():
    rng = np.random.default_rng(0)
    n, f, h, w, g, cg = 2, 16, 32, 32, 4, 3
    x = (-1.83 + 0.2 * rng.standard_normal((n, f, h, w, g * cg))).astype(np.float32)
    scale = (1 + 0.2 * rng.standard_normal(g * cg)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(g * cg)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda x: group_norm(x, scale, bias, g, 1e-6))(x))
    x64 = x.astype(np.float64).reshape(n, -1, g, cg)
    ref64 = ((x64 - x64.mean(axis=(1, 3), keepdims=True)) / np.sqrt(x64.var(axis=(1, 3), keepdims=True) + 1e-6))
    ref64 = ref64.reshape(x.shape) * scale + bias
    tn = torch.nn.GroupNorm(g, g * cg, eps=1e-6)
    with torch.no_grad():
        tn.weight.copy_(torch.from_numpy(scale))
        tn.bias.copy_(torch.from_numpy(bias))
        tref = tn(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy()
    err64 = np.abs(ours - ref64).max()
    errt = np.abs(ours - np.moveaxis(tref, 1, -1)).max()
    print(f"\ngroup_norm (jit, mean -1.8, {f * h * w * cg} elements/group): max abs err vs float64 {err64:.3g}, vs torch {errt:.3g}")
    assert err64 < 2e-5 and errt < 2e-5
