"""The per-window sampler: condition assembly, two-factor guidance and the whole denoising loop in one jit.

Spec sections 4.3-4.4 and 5.3. For one window of ``F`` frames on an ``H x W`` canvas (latents ``h x w``):

* conditions (channels-last, batch 1): ``cond`` = latents of the black-padded canvas, ``uncond`` = the
  latent of an all-black image repeated over frames, ``mask`` = the pixel mask sampled at latent
  resolution, ``umask`` = ones. Known frames from earlier windows replace both ``cond`` and ``uncond`` at
  their slot, and both masks are 0 there (:func:`assemble_conditions`);
* the U-Net input rows and the guidance combination depend on the two scales (local ``s_l``, global
  ``s_g``), spec 4.4:

  ============  ===================================  ======================================
  scales        rows (local condition / context)     guided eps
  ============  ===================================  ======================================
  both > 1      uu, cu, uc, cc (``guidance=4``)      ``uu + s_l (cu - uu) + s_g (cc - cu)``
  s_l > 1 only  uu/zero, cu/global (``guidance=2``)  ``e0 + s_l (e1 - e0)``
  s_g > 1 only  cu/zero, cu/global (``guidance=2``)  ``e0 + s_g (e1 - e0)`` (the reference raises)
  neither       cu/global (``guidance=1``)           ``e0``
  ============  ===================================  ======================================

* :class:`Denoiser` jits the full loop (``lax.fori_loop`` over the sampler's steps, U-Net inside) once per
  input shape; every window and pass of a video reuses the compiled function. ``trace_count`` counts how
  often it was traced (tests assert one trace per video).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.diffusion import add_noise, alphas_cumprod, make_sampler
from m3ddm_jax.diffusion.samplers import SamplerSpec, run_sampler
from m3ddm_jax.diffusion.schedule import ScheduleConfig


@dataclasses.dataclass(frozen=True)
class Guidance:
    local_scale: float = 2.0     # s_l: masked-video (local) condition
    global_scale: float = 4.0    # s_g: global frames

    @property
    def mode(self) -> str:
        l, g = self.local_scale > 1, self.global_scale > 1
        return {(True, True): "two_factor", (True, False): "local", (False, True): "global", (False, False): "none"}[(l, g)]

    @property
    def unet_guidance(self) -> int:
        return {"two_factor": 4, "local": 2, "global": 2, "none": 1}[self.mode]


def assemble_conditions(z_mask: jax.Array, z_black: jax.Array, m_lat: jax.Array, known_latents: jax.Array,
                        known: jax.Array):
    """``z_mask (F, h, w, C)``, ``z_black (h, w, C)``, ``m_lat (h, w)``, ``known_latents (F, h, w, C)``,
    ``known (F,)`` bool -> ``(cond, uncond, mask, umask)`` with masks ``(F, h, w, 1)``."""
    f = z_mask.shape[0]
    k = known.astype(bool)[:, None, None, None]
    cond = jnp.where(k, known_latents, z_mask)
    uncond = jnp.where(k, known_latents, jnp.broadcast_to(z_black[None], z_mask.shape))
    m = jnp.broadcast_to(m_lat.astype(z_mask.dtype)[None, :, :, None], (f,) + m_lat.shape + (1,))
    mask = jnp.where(k, 0.0, m).astype(z_mask.dtype)
    umask = jnp.where(k, 0.0, jnp.ones_like(m)).astype(z_mask.dtype)
    return cond, uncond, mask, umask


def unet_rows(x: jax.Array, cond, uncond, mask, umask, guidance: Guidance) -> jax.Array:
    """The U-Net input ``(B', F, h, w, 2C+1)`` for a latent ``x (1, F, h, w, C)`` (batch 1)."""
    cu = jnp.concatenate([x, cond[None], mask[None]], axis=-1)
    uu = jnp.concatenate([x, uncond[None], umask[None]], axis=-1)
    mode = guidance.mode
    if mode == "two_factor":
        return jnp.concatenate([uu, cu, uu, cu], axis=0)
    if mode == "local":
        return jnp.concatenate([uu, cu], axis=0)
    if mode == "global":
        return jnp.concatenate([cu, cu], axis=0)
    return cu


def combine(eps: jax.Array, guidance: Guidance) -> jax.Array:
    """Guided eps ``(1, F, h, w, C)`` from the U-Net rows, in the reference's evaluation order."""
    s_l, s_g = guidance.local_scale, guidance.global_scale
    mode = guidance.mode
    if mode == "two_factor":
        uu, cu, _uc, cc = eps[0:1], eps[1:2], eps[2:3], eps[3:4]
        return uu + s_l * (cu - uu) + s_g * (cc - cu)
    if mode == "local":
        return eps[0:1] + s_l * (eps[1:2] - eps[0:1])
    if mode == "global":
        return eps[0:1] + s_g * (eps[1:2] - eps[0:1])
    return eps


# -- step progress: the compiled loop reports each finished U-Net call to whatever sink is current ------------

_step_sink: Callable[[int], None] | None = None
_step_sink_lock = threading.Lock()


def _on_step(i, _probe) -> None:
    sink = _step_sink
    if sink is not None:
        sink(int(i))


@contextlib.contextmanager
def report_steps(sink: Callable[[int], None] | None):
    """Within the block, every finished denoising call of any :class:`Denoiser` calls ``sink(i)`` on the host
    (``i``: the call's index in its window's loop). One sink at a time per process: blocks are serialised."""
    global _step_sink
    with _step_sink_lock:
        _step_sink = sink
        try:
            yield
        finally:
            _step_sink = None


class Denoiser:
    """The jitted denoising loop of one window: ``(unet_state, x_start, conditions, global latents, fps) -> z0``.

    With ``report=True`` (default) the loop calls the host after every step (:func:`report_steps`); the cost
    is one tiny device-to-host transfer per step (measured in tests/test_api.py and bench/infer.py)."""

    def __init__(self, unet_graphdef: nnx.GraphDef, spec: SamplerSpec, guidance: Guidance = Guidance(),
                 report: bool = True):
        self.graphdef = unet_graphdef
        self.spec = spec
        self.guidance = guidance
        self.report = report
        self.trace_count = 0
        self._jit = jax.jit(self._denoise, donate_argnums=(1,))

    def _denoise(self, unet_state, x_start, cond, uncond, mask, umask, global_latents, fps):
        self.trace_count += 1  # runs at trace time only
        model = nnx.merge(self.graphdef, unet_state)
        g = self.guidance

        def eps_fn(x, t):
            rows = unet_rows(x, cond, uncond, mask, umask, g)
            out = model(rows, t, global_latents, fps, guidance=g.unet_guidance)
            return combine(out, g).astype(x.dtype)

        return run_sampler(self.spec, eps_fn, x_start, on_step=_on_step if self.report else None)

    def __call__(self, unet_state, x_start, cond, uncond, mask, umask, global_latents, fps):
        return self._jit(unet_state, x_start, cond, uncond, mask, umask, global_latents, jnp.asarray(fps, jnp.float32))

    def eps_fn_for_test(self, unet_state, cond, uncond, mask, umask, global_latents, fps):
        """The guided eps of one call (same code path as the loop; used by tests)."""
        model = nnx.merge(self.graphdef, unet_state)
        g = self.guidance

        def eps_fn(x, t):
            rows = unet_rows(x, cond, uncond, mask, umask, g)
            return rows, model(rows, t, global_latents, fps, guidance=g.unet_guidance)

        return eps_fn


def start_latent(z_init: jax.Array, eps0: jax.Array, spec: SamplerSpec, cfg: ScheduleConfig = ScheduleConfig()) -> jax.Array:
    """The SDEdit start: ``z_init`` noised to the sampler's start level (961 for the reference PLMS)."""
    return add_noise(z_init, eps0, spec.noise_timestep, jnp.asarray(alphas_cumprod(cfg)))


@functools.lru_cache(maxsize=16)
def _denoiser(graphdef: nnx.GraphDef, sampler: str, steps: int, guidance: Guidance, schedule: ScheduleConfig,
              report: bool = True) -> Denoiser:
    return Denoiser(graphdef, make_sampler(sampler, steps, schedule), guidance, report)


def build_denoiser(unet, sampler: str = "plms", steps: int = 50, guidance: Guidance = Guidance(),
                   schedule: ScheduleConfig = ScheduleConfig(), report: bool = True) -> tuple[Denoiser, nnx.State]:
    """Split the U-Net once and get its :class:`Denoiser`; returns ``(denoiser, unet_state)``.

    Denoisers are cached by (model structure, sampler, steps, guidance, schedule), so every
    :class:`~m3ddm_jax.outpaint.pipeline.Outpainter` over the same model shares one compiled loop per shape.
    """
    graphdef, state = nnx.split(unet)
    return _denoiser(graphdef, sampler, steps, guidance, schedule, report), state


__all__ = ["Guidance", "assemble_conditions", "unet_rows", "combine", "Denoiser", "report_steps", "start_latent",
           "build_denoiser", "np"]
