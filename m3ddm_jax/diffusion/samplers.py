"""Diffusion samplers as pure step functions with explicit state.

Two samplers, both for epsilon-prediction models on the schedule of :mod:`schedule`:

* ``"plms"``: the reference's 50-step PNDM scheduler in PLMS mode (diffusers ``PNDMScheduler`` with
  ``skip_prk_steps``), including the reference pipeline's SDEdit start (spec section 4.3): the
  latent is noised to ``t = 961`` and the loop starts at index 1 of the PLMS list ``[981, 961, 961, 941,
  ..., 1]``, so the warm-up step treats that latent as level 981. This is what the released model was run
  with; it is reproduced, not fixed, so our outputs match the reference's.
* ``"ddim"``: deterministic DDIM (eta 0, as diffusers ``DDIMScheduler`` with the SD-1.5 config), started
  at the first timestep of its list.

A sampler is a :class:`SamplerSpec`: the timestep at which the start latent is noised, the timesteps of
the model calls (one per loop iteration), ``init(x)`` -> state and ``step(state, eps, i, x) -> (x, state)``
where ``i`` is the loop index (a traced int is fine: the step is written for ``lax.fori_loop``/``scan``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m3ddm_jax.diffusion.schedule import ScheduleConfig, alphas_cumprod, final_alpha_cumprod
from m3ddm_jax.errors import ConfigError

SAMPLERS = ("plms", "ddim")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    name: str
    noise_timestep: int            # level of the SDEdit start latent
    loop_timesteps: np.ndarray     # int32 (n_calls,): timestep label of each model call
    init: Callable[[jax.Array], Any]
    step: Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]

    @property
    def num_calls(self) -> int:
        return int(len(self.loop_timesteps))


def leading_timesteps(num_steps: int, cfg: ScheduleConfig) -> np.ndarray:
    """diffusers' "leading" spacing, ascending: ``arange(n) * (T // n) + steps_offset``."""
    if not 1 <= num_steps <= cfg.num_train_timesteps:
        raise ConfigError(f"num_inference_steps must be in 1..{cfg.num_train_timesteps}, got {num_steps}")
    ratio = cfg.num_train_timesteps // num_steps
    return (np.arange(num_steps) * ratio).round().astype(np.int64) + cfg.steps_offset


def _prev_sample(x, eps, a_t, a_prev):
    """PNDM's update from level ``t`` (abar ``a_t``) to ``prev`` (abar ``a_prev``), float order as diffusers."""
    beta_t = 1.0 - a_t
    beta_prev = 1.0 - a_prev
    sample_coeff = jnp.sqrt(a_prev / a_t)
    denom = a_t * jnp.sqrt(beta_prev) + jnp.sqrt(a_t * beta_t * a_prev)
    return sample_coeff * x - (a_prev - a_t) * eps / denom


# -- PLMS ------------------------------------------------------------------------------------------

class PLMSState(NamedTuple):
    ets: jax.Array      # (4, *x.shape): past model outputs, most recent last
    n_ets: jax.Array    # int32: how many of ets are filled (<= 4)
    counter: jax.Array  # int32: steps taken
    cur: jax.Array      # the sample saved by the first step (used by the second)


def plms_timesteps(num_steps: int, cfg: ScheduleConfig) -> np.ndarray:
    """The PLMS list of ``PNDMScheduler.set_timesteps`` with ``skip_prk_steps`` (``num_steps + 1`` entries)."""
    ts = leading_timesteps(num_steps, cfg)
    return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()


def make_plms(num_steps: int = 50, strength: float = 1.0, cfg: ScheduleConfig = ScheduleConfig()) -> SamplerSpec:
    if num_steps < 2:
        raise ConfigError(f"the PLMS sampler needs at least 2 steps, got {num_steps}")
    abar = jnp.asarray(alphas_cumprod(cfg))
    final = jnp.float32(final_alpha_cumprod(cfg))
    step_size = cfg.num_train_timesteps // num_steps
    plms_ts = plms_timesteps(num_steps, cfg)
    # The reference pipeline's img2img bookkeeping (with steps_offset) on the PLMS list.
    init_timestep = min(int(num_steps * strength) + cfg.steps_offset, num_steps)
    t_start = max(num_steps - init_timestep + cfg.steps_offset, 0)
    noise_t = int(plms_ts[-init_timestep])
    loop_ts = plms_ts[t_start:].astype(np.int32)

    def init(x):
        return PLMSState(
            ets=jnp.zeros((4,) + x.shape, x.dtype), n_ets=jnp.int32(0), counter=jnp.int32(0), cur=jnp.zeros_like(x)
        )

    def step(state: PLMSState, eps, i, x):
        t = jnp.asarray(loop_ts)[i]
        second = state.counter == 1
        # Every step but the second appends eps to the history (keeping the last 4).
        appended = jnp.concatenate([state.ets[1:], eps[None]], axis=0)
        ets = jnp.where(second, state.ets, appended)
        n = jnp.where(second, state.n_ets, jnp.minimum(state.n_ets + 1, 4))
        t_from = jnp.where(second, t + step_size, t)
        t_to = jnp.where(second, t, t - step_size)
        case = jnp.where(state.counter == 0, 0, jnp.where(second, 1, jnp.clip(n, 2, 4)))
        e1, e2, e3, e4 = ets[3], ets[2], ets[1], ets[0]  # e1 = most recent
        eps_hat = jax.lax.switch(
            jnp.clip(case, 0, 4),
            [
                lambda: eps,
                lambda: (eps + e1) / 2,
                lambda: (3 * e1 - e2) / 2,
                lambda: (23 * e1 - 16 * e2 + 5 * e3) / 12,
                lambda: (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4) / 24,
            ],
        )
        sample = jnp.where(second, state.cur, x)
        cur = jnp.where(state.counter == 0, x, state.cur)
        a_t = abar[t_from]
        a_prev = jnp.where(t_to >= 0, abar[jnp.maximum(t_to, 0)], final)
        x_prev = _prev_sample(sample, eps_hat, a_t, a_prev).astype(x.dtype)
        return x_prev, PLMSState(ets=ets, n_ets=n.astype(jnp.int32), counter=state.counter + 1, cur=cur)

    return SamplerSpec("plms", noise_t, loop_ts, init, step)


# -- DDIM ------------------------------------------------------------------------------------------

def make_ddim(num_steps: int = 50, cfg: ScheduleConfig = ScheduleConfig()) -> SamplerSpec:
    abar = jnp.asarray(alphas_cumprod(cfg))
    final = jnp.float32(final_alpha_cumprod(cfg))
    step_size = cfg.num_train_timesteps // num_steps
    loop_ts = leading_timesteps(num_steps, cfg)[::-1].astype(np.int32).copy()

    def init(x):
        return ()

    def step(state, eps, i, x):
        t = jnp.asarray(loop_ts)[i]
        prev = t - step_size
        a_t = abar[t]
        a_prev = jnp.where(prev >= 0, abar[jnp.maximum(prev, 0)], final)
        beta_t = 1.0 - a_t
        x0 = (x - jnp.sqrt(beta_t) * eps) / jnp.sqrt(a_t)
        direction = jnp.sqrt(1.0 - a_prev) * eps
        return (jnp.sqrt(a_prev) * x0 + direction).astype(x.dtype), state

    return SamplerSpec("ddim", int(loop_ts[0]), loop_ts, init, step)


def make_sampler(name: str = "plms", num_steps: int = 50, cfg: ScheduleConfig = ScheduleConfig(), strength: float = 1.0) -> SamplerSpec:
    if name == "plms":
        return make_plms(num_steps, strength, cfg)
    if name == "ddim":
        return make_ddim(num_steps, cfg)
    raise ConfigError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


def run_sampler(spec: SamplerSpec, eps_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                on_step: Callable | None = None) -> jax.Array:
    """Run the whole loop under ``lax.fori_loop``: ``eps_fn(x, t) -> eps``. Returns the final sample.

    ``on_step(i, probe)``, if given, is called on the host (``jax.debug.callback``) after call ``i`` of the
    U-Net finished: ``probe`` is one element of the new sample, a data dependency that makes the callback
    wait for the step rather than fire when the loop starts it. The loop stays one compiled ``fori_loop``.
    """
    ts = jnp.asarray(spec.loop_timesteps)

    def body(i, carry):
        x, state = carry
        eps = eps_fn(x, ts[i])
        new = spec.step(state, eps, i, x)
        if on_step is not None:
            jax.debug.callback(on_step, i, new[0].reshape(-1)[0])
        return new

    x, _ = jax.lax.fori_loop(0, spec.num_calls, body, (x, spec.init(x)))
    return x
