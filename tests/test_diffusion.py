"""Schedulers: parity with diffusers' PNDM (PLMS) and DDIM, and with the recorded reference sampler."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3ddm_jax.diffusion import ScheduleConfig, add_noise, alphas_cumprod, make_sampler
from m3ddm_jax.diffusion.samplers import plms_timesteps, run_sampler

SHAPE = (1, 4, 6, 8, 8)


@pytest.fixture(scope="module")
def sampler_npz(fixtures_dir):
    return np.load(fixtures_dir / "window_sampler" / "sampler.npz")


@pytest.fixture(scope="module")
def sched_cfg(fixtures_dir):
    return ScheduleConfig.from_dict(json.loads((fixtures_dir / "window_sampler" / "scheduler" / "scheduler_config.json").read_text()))


_ABAR = jnp.asarray(alphas_cumprod())


def _eps_model(x, t, noises):
    """A deterministic stand-in for the U-Net that depends on x and t (so errors feed back): the exact eps
    towards a fixed random target ``noises[0]``, perturbed by a t-dependent random field. Trajectories stay
    at the scale of real latents (|x| of a few units)."""
    a = _ABAR[t]
    return (x - jnp.sqrt(a) * noises[0]) / jnp.sqrt(1.0 - a) + 0.2 * noises[1 + t % (noises.shape[0] - 1)]


def _trajectory(spec, nz, x):
    """Every sample of the sampler's loop driven by :func:`_eps_model` (one jitted scan)."""
    ts = jnp.asarray(spec.loop_timesteps)

    def body(carry, i):
        x, st = carry
        x, st = spec.step(st, _eps_model(x, ts[i], nz), i, x)
        return (x, st), x

    return jax.jit(lambda x: jax.lax.scan(body, (x, spec.init(x)), jnp.arange(spec.num_calls))[1])(x)


def test_schedule_matches_reference_tables(sampler_npz, sched_cfg):
    abar = alphas_cumprod(sched_cfg)
    err = np.abs(abar - sampler_npz["sched.alphas_cumprod"]).max()
    print(f"\nalphas_cumprod max abs err vs reference: {err:.3g}")
    assert err == 0.0
    np.testing.assert_array_equal(plms_timesteps(50, sched_cfg), sampler_npz["sched.timesteps"])
    spec = make_sampler("plms", 50, sched_cfg)
    assert spec.noise_timestep == int(sampler_npz["sched.noise_timestep"]) == 961
    np.testing.assert_array_equal(spec.loop_timesteps, sampler_npz["sched.loop_timesteps"])
    np.testing.assert_array_equal(spec.loop_timesteps, sampler_npz["steps.t"])


def test_plms_replays_recorded_reference_steps(sampler_npz, sched_cfg):
    """Feed the recorded guided eps of every step: every recorded latent is reproduced (warm-up quirk included)."""
    spec = make_sampler("plms", 50, sched_cfg)
    eps_all = jnp.asarray(sampler_npz["steps.eps_guided"])
    ref = sampler_npz["steps.x"]

    @jax.jit
    def replay(x0):
        def body(carry, i):
            x, st = carry
            x, st = spec.step(st, eps_all[i], i, x)
            return (x, st), x

        _, xs = jax.lax.scan(body, (x0, spec.init(x0)), jnp.arange(spec.num_calls))
        return xs

    xs = np.asarray(replay(jnp.asarray(sampler_npz["lat.x_start"])))
    err = np.abs(xs - ref).max(axis=tuple(range(1, xs.ndim)))
    print(f"\nPLMS replay of the recorded sampler: max abs err step0 {err[0]:.3g}, step1 {err[1]:.3g}, "
          f"max over 50 steps {err.max():.3g} (|x| max {np.abs(ref).max():.3g})")
    assert err.max() < 1e-4 * np.abs(ref).max()


def test_plms_trajectory_matches_diffusers(sched_cfg):
    from diffusers import PNDMScheduler

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((7,) + SHAPE).astype(np.float32)
    spec = make_sampler("plms", 50, sched_cfg)

    # diffusers, driven as the reference pipeline drives it (loop from index 1 of the PLMS list).
    import torch

    sched = PNDMScheduler(**{k: v for k, v in vars(sched_cfg).items()}, skip_prk_steps=True)
    sched.set_timesteps(50)
    x = torch.from_numpy(x0)
    ref = []
    nz = jnp.asarray(noises)
    for t in sched.timesteps[1:]:
        eps = torch.from_numpy(np.array(_eps_model(jnp.asarray(x.numpy()), int(t), nz)))
        x = sched.step(eps, t, x).prev_sample
        ref.append(x.numpy())
    ref = np.stack(ref)

    xs = np.asarray(_trajectory(spec, nz, jnp.asarray(x0)))
    err = np.abs(xs - ref).max()
    print(f"\nPLMS 50-step trajectory vs diffusers PNDMScheduler: max abs err {err:.3g} (|x| max {np.abs(ref).max():.3g})")
    assert err < 1e-5
    # The fori_loop driver gives the same final sample as the scan.
    final = np.asarray(jax.jit(lambda x: run_sampler(spec, lambda x, t: _eps_model(x, t, nz), x))(jnp.asarray(x0)))
    assert np.abs(final - xs[-1]).max() < 1e-6


def test_ddim_trajectory_matches_diffusers(sched_cfg):
    from diffusers import DDIMScheduler

    import torch

    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    nz = jnp.asarray(rng.standard_normal((5,) + SHAPE).astype(np.float32))
    spec = make_sampler("ddim", 50, sched_cfg)
    sched = DDIMScheduler(
        beta_start=sched_cfg.beta_start, beta_end=sched_cfg.beta_end, beta_schedule=sched_cfg.beta_schedule,
        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    sched.set_timesteps(50)
    np.testing.assert_array_equal(spec.loop_timesteps, sched.timesteps.numpy())
    x = torch.from_numpy(x0)
    ref = []
    for t in sched.timesteps:
        eps = torch.from_numpy(np.array(_eps_model(jnp.asarray(x.numpy()), int(t), nz)))
        x = sched.step(eps, t, x, eta=0.0).prev_sample
        ref.append(x.numpy())
    ref = np.stack(ref)

    err = np.abs(np.asarray(_trajectory(spec, nz, jnp.asarray(x0))) - ref).max()
    print(f"\nDDIM 50-step trajectory vs diffusers DDIMScheduler: max abs err {err:.3g} (|x| max {np.abs(ref).max():.3g})")
    assert err < 1e-5


def test_add_noise_matches_reference(sampler_npz, sched_cfg):
    abar = jnp.asarray(alphas_cumprod(sched_cfg))
    x = add_noise(jnp.asarray(sampler_npz["lat.ori_latents"]), jnp.asarray(sampler_npz["noise.eps0"]), 961, abar)
    err = np.abs(np.asarray(x) - sampler_npz["lat.x_start"]).max()
    print(f"\nadd_noise at t=961 vs reference x_start: max abs err {err:.3g}")
    assert err < 1e-5
    # one timestep per batch row
    xs = add_noise(jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.array([0, 999]), abar)
    np.testing.assert_allclose(np.asarray(xs[:, 0]), np.sqrt(np.asarray(abar)[[0, 999]]), rtol=1e-6)


def test_unknown_sampler_is_a_config_error():
    from m3ddm_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown sampler"):
        make_sampler("euler")
    with pytest.raises(ConfigError, match="at least 2 steps"):
        make_sampler("plms", 1)
    assert make_sampler("plms", 2).num_calls == 2 and make_sampler("ddim", 1).num_calls == 1
    with pytest.raises(ConfigError, match="timestep_spacing"):
        ScheduleConfig.from_dict({"timestep_spacing": "trailing"})
