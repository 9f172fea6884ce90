#!/usr/bin/env python
"""Full-size U-Net window loop on an accelerator: seconds per 50-step window and per step, peak memory.

    python bench/gpu_window.py [--variants fp32-xla,bf16-xla,bf16-cudnn] [--steps 50]

Random weights (timing only), batch 4 (two-factor guidance) x 16 frames x 32x32 latents, 16 global frames.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from m3ddm_jax.diffusion import make_sampler  # noqa: E402
from m3ddm_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig, param_count, unet_from_config  # noqa: E402
from m3ddm_jax.outpaint.sampler import Denoiser, Guidance  # noqa: E402


def peak_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="fp32-xla,bf16-xla,bf16-cudnn")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    import flax

    print(f"jax {jax.__version__} flax {flax.__version__} devices {jax.devices()}", flush=True)
    cfg = UNet3DConfig()
    t = time.perf_counter()
    model = unet_from_config(cfg, 0)
    _, state = nnx.split(model)
    jax.block_until_ready(state)
    print(f"init {param_count(model) / 1e9:.3f} B params in {time.perf_counter() - t:.1f} s, peak {peak_gib():.1f} GiB", flush=True)
    del model
    f, h, w = 16, 32, 32
    key = jax.random.key(0)
    ks = jax.random.split(key, 4)
    x = jax.random.normal(ks[0], (1, f, h, w, 4))
    cond = jax.random.normal(ks[1], (f, h, w, 4))
    mask = jnp.ones((f, h, w, 1))
    glob = jax.random.normal(ks[2], (16, 32, 32, 4))
    spec = make_sampler("plms", args.steps)
    for variant in args.variants.split(","):
        prec, impl = variant.split("-")
        dtype = jnp.bfloat16 if prec == "bf16" else None
        abstract = nnx.eval_shape(lambda: UNet3DConditionModel(cfg, dtype=dtype, attention_impl=impl, rngs=nnx.Rngs(0)))
        gd, _ = nnx.split(abstract)
        den = Denoiser(gd, spec, Guidance())
        try:
            t = time.perf_counter()
            out = den(state, x + 0, cond, cond, mask, mask, glob, 24.0)
            jax.block_until_ready(out)
            first = time.perf_counter() - t
            t = time.perf_counter()
            out = den(state, x + 0, cond, cond, mask, mask, glob, 24.0)
            jax.block_until_ready(out)
            warm = time.perf_counter() - t
            finite = bool(jnp.isfinite(out).all())
            print(f"{variant}: first call (compile + run) {first:.1f} s, {args.steps}-step window {warm:.2f} s = "
                  f"{warm / args.steps * 1e3:.1f} ms/step, finite {finite}, peak {peak_gib():.1f} GiB", flush=True)
        except Exception as e:  # one failing variant must not hide the others
            print(f"{variant}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


if __name__ == "__main__":
    main()
