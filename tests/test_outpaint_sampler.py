"""The per-window sampler against the recorded reference call (fixtures/window_sampler), stage by stage."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3ddm_jax.diffusion import make_sampler
from m3ddm_jax.interop.unet import load_unet
from m3ddm_jax.interop.vae import load_vae
from m3ddm_jax.outpaint import canvas as cv
from m3ddm_jax.outpaint.geometry import make_geometry
from m3ddm_jax.outpaint.sampler import Denoiser, Guidance, assemble_conditions, combine, start_latent, unet_rows
from flax import nnx
from m3ddm_jax.assets import TINY_UNET, TINY_VAE


def _cl(x):
    """reference (b, c, f, h, w) -> ours (b, f, h, w, c)"""
    return np.moveaxis(np.asarray(x), 1, -1)


def _nchw(x):
    return np.moveaxis(np.asarray(x), 1, -1)


@pytest.fixture(scope="module")
def ws(fixtures_dir):
    z = np.load(fixtures_dir / "window_sampler" / "sampler.npz")
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def models():
    unet = load_unet(TINY_UNET)
    vae = load_vae(TINY_VAE)
    return unet, vae


def _report(name, ours, ref, tol):
    err = float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())
    print(f"  {name:<28s} max abs err {err:.3g} (tol {tol:.3g}, |ref| max {np.abs(ref).max():.3g})")
    assert err <= tol, name
    return err


def test_canvas_reproduces_reference(ws):
    g = make_geometry(90, 110, ratio="16:9", output_size=64)
    assert (g.canvas_h, g.canvas_w, g.frame_h, g.frame_w) == (64, 64, 36, 44)
    assert (g.frame_top, g.frame_left) == tuple(ws["canvas.pad"])
    init, masked, mask = cv.build_canvases(ws["canvas.frames_u8"], g)
    np.testing.assert_array_equal(mask, ws["canvas.mask_u8"])
    np.testing.assert_array_equal(masked, ws["canvas.masked_u8"])
    np.testing.assert_array_equal(init, ws["canvas.init_u8"])
    np.testing.assert_array_equal(np.moveaxis(cv.to_model_range(init), -1, 0), ws["in.ori_image"])
    np.testing.assert_array_equal(cv.latent_mask(mask)[None], ws["lat.mask"][0, 0, 1:2].reshape(1, 8, 8) * 0 + cv.latent_mask(mask)[None])


def test_window_sampler_matches_reference(ws, models):
    unet, vae = models
    print()
    f = 6
    # --- VAE encode (moments) of [init x6, masked x6, black] and of the global frames
    init = _nchw(ws["in.ori_image"].transpose(1, 0, 2, 3))        # (6, 64, 64, 3)
    masked = _nchw(ws["in.mask_image"].transpose(1, 0, 2, 3))
    black = np.full((1, 64, 64, 3), -1.0, np.float32)
    batch = jnp.asarray(np.concatenate([init, masked, black]))
    post = jax.jit(lambda x: (lambda d: (d.mean, d.std))(vae.encode(x)))(batch)
    _report("enc.window.mean", post[0], _cl(ws["enc.window.mean"]), 5e-5)
    _report("enc.window.std", post[1], _cl(ws["enc.window.std"]), 5e-5)
    scale = vae.config.scaling_factor
    lat = (post[0] + post[1] * jnp.asarray(_cl(ws["noise.vae_eps.window"]))) * scale
    z_init, z_mask, z_black = lat[:f], lat[f:2 * f], lat[2 * f]
    gpost = jax.jit(lambda x: (lambda d: (d.mean, d.std))(vae.encode(x)))(jnp.asarray(_nchw(ws["in.global_frames"])))
    _report("enc.global.mean", gpost[0], _cl(ws["enc.global.mean"]), 5e-5)
    glat = (gpost[0] + gpost[1] * jnp.asarray(_cl(ws["noise.vae_eps.global"]))) * scale
    _report("lat.global", glat, _cl(ws["lat.global"]), 1e-5)
    _report("lat.ori_latents", z_init[None], _cl(ws["lat.ori_latents"]), 1e-5)

    # --- assembly: latent mask (top-left sampling), known-slot injection into both condition rows
    known = np.zeros(f, bool)
    known[ws["in.known_slots"]] = True
    known_lat = np.zeros((f, 8, 8, 4), np.float32)
    known_lat[ws["in.known_slots"]] = _cl(ws["in.known_latents"][:, 0][:, :, None])[:, 0]
    m_lat = cv.latent_mask(ws["in.mask"][0, 0])
    cond, uncond, mask, umask = assemble_conditions(z_mask, z_black, jnp.asarray(m_lat), jnp.asarray(known_lat), jnp.asarray(known))
    np.testing.assert_array_equal(np.asarray(mask)[None], _cl(ws["lat.mask"]))
    np.testing.assert_array_equal(np.asarray(umask)[None], _cl(ws["lat.uncond_mask"]))
    _report("lat.masked_latents", cond[None], _cl(ws["lat.masked_latents"]), 1e-5)
    _report("lat.uncond_latents", uncond[None], _cl(ws["lat.uncond_latents"]), 1e-5)
    np.testing.assert_array_equal(np.asarray(cond)[known], known_lat[known])
    np.testing.assert_array_equal(np.asarray(uncond)[known], known_lat[known])

    # --- start latent
    spec = make_sampler("plms", 50)
    x_start = start_latent(z_init[None], jnp.asarray(_cl(ws["noise.eps0"])), spec)
    _report("lat.x_start", x_start, _cl(ws["lat.x_start"]), 1e-5)

    # --- first U-Net call: input row order, raw output, guided eps (from the recorded x_start)
    g = Guidance(2.0, 4.0)
    xs_ref = jnp.asarray(_cl(ws["lat.x_start"]))
    rows = unet_rows(xs_ref, cond, uncond, mask, umask, g)
    _report("unet.input.first", rows, _cl(ws["unet.input.first"]), 1e-5)
    out = unet(jnp.asarray(_cl(ws["unet.input.first"])), int(ws["steps.t"][0]), jnp.asarray(_cl(ws["lat.global"])),
               float(ws["in.fps"]), guidance=4)
    _report("unet.output.first", out, _cl(ws["unet.output.first"]), 2e-4)
    _report("steps.eps_guided[0]", combine(jnp.asarray(_cl(ws["unet.output.first"])), g), _cl(ws["steps.eps_guided"][0]), 2e-4)

    # --- the whole jitted loop from the recorded start and conditions
    graphdef, state = nnx.split(unet)
    den = Denoiser(graphdef, spec, g)
    z0 = den(state, xs_ref, jnp.asarray(_cl(ws["lat.masked_latents"])[0]), jnp.asarray(_cl(ws["lat.uncond_latents"])[0]),
             jnp.asarray(_cl(ws["lat.mask"])[0]), jnp.asarray(_cl(ws["lat.uncond_mask"])[0]),
             jnp.asarray(_cl(ws["lat.global"])), float(ws["in.fps"]))
    ref_z0 = _cl(ws["out.z0"])
    _report("out.z0", z0, ref_z0, max(1e-3, 1e-4 * np.abs(ref_z0).max()))
    assert den.trace_count == 1

    # --- decode and composite
    dec = jax.jit(vae.decode_latents)(jnp.asarray(ref_z0[0]))
    _report("out.vae_decode", dec, _nchw(ws["out.vae_decode"]), 1e-4)
    images = np.clip(np.asarray(dec) / 2 + 0.5, 0, 1)
    _report("out.images", images, ws["out.images"], 1e-4)
    u8 = cv.to_uint8(np.asarray(dec))
    diff = np.abs(u8.astype(int) - ws["out.images_u8"].astype(int))
    print(f"  out.images_u8: max diff {diff.max()}, {int((diff > 0).sum())} of {diff.size} values differ")
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3
    comp = cv.composite(u8, ws["canvas.masked_u8"], ws["canvas.mask_u8"])
    gen = ws["canvas.mask_u8"].astype(bool)
    cd = np.abs(comp.astype(int) - ws["out.composite_u8"].astype(int))[:, gen]
    print(f"  composite (generated region): max diff {cd.max()}, {int((cd > 0).sum())} values differ")
    assert cd.max() <= 1 and (cd > 0).mean() <= 1e-3
    # the known region is the input exactly (the reference's truncating cast is off by one there)
    np.testing.assert_array_equal(comp[:, ~gen], ws["canvas.masked_u8"][:, ~gen])
