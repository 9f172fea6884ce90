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
  both > 1      uu, cu, cc (``rows=3``, default) or  ``uu + s_l (cu - uu) + s_g (cc - cu)``
                uu, cu, uc, cc (``rows=4``, the
                reference's batch; ``uc`` unread)
  s_l > 1 only  uu/zero, cu/global (``guidance=2``)  ``e0 + s_l (e1 - e0)``
  s_g > 1 only  cu/zero, cu/global (``guidance=2``)  ``e0 + s_g (e1 - e0)`` (the reference raises)
  neither       cu/global (``guidance=1``)           ``e0``
  ============  ===================================  ======================================

* :class:`Denoiser` jits the full loop (``lax.fori_loop`` over the sampler's steps, U-Net inside) once per
  input shape. It runs ``W`` independent windows at once (a wave, possibly of several videos): every array
  has a leading window axis, each window its own start latent, conditions, global latents and fps, all at
  the same timesteps. U-Net rows are window-major (row ``w * R + r``), so with a device mesh the window
  axis is sharded and no row ever leaves its device; the global encoder's tokens are computed once per call,
  before the loop. ``trace_count`` counts how often it was traced (tests assert one trace per shape).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import weakref
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.diffusion import add_noise, alphas_cumprod, make_sampler
from m3ddm_jax.diffusion.samplers import SamplerSpec, run_sampler
from m3ddm_jax.diffusion.schedule import ScheduleConfig
from m3ddm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Guidance:
    local_scale: float = 2.0     # s_l: masked-video (local) condition
    global_scale: float = 4.0    # s_g: global frames
    rows: int = 4                # two-factor only: 4 = the reference's batch, 3 = the rows the combination reads

    def __post_init__(self):
        if self.rows not in (3, 4):
            raise ConfigError(f"guidance rows must be 3 or 4, got {self.rows!r}")

    @property
    def mode(self) -> str:
        l, g = self.local_scale > 1, self.global_scale > 1
        return {(True, True): "two_factor", (True, False): "local", (False, True): "global", (False, False): "none"}[(l, g)]

    @property
    def unet_guidance(self) -> int:
        """Rows per window (the U-Net's ``guidance``)."""
        return {"two_factor": self.rows, "local": 2, "global": 2, "none": 1}[self.mode]

    @property
    def global_rows(self) -> tuple[bool, ...]:
        """Per row: does its context see the global frames (else the zero frames)."""
        return {"two_factor": (False, False, True) if self.rows == 3 else (False, False, True, True),
                "local": (False, True), "global": (False, True), "none": (True,)}[self.mode]


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
    """The U-Net input ``(W * R, F, h, w, 2C+1)``, window-major, for latents ``x (W, F, h, w, C)`` and conditions
    ``(W, F, ...)`` (or ``(F, ...)`` for one window)."""
    if cond.ndim == 4:
        cond, uncond, mask, umask = cond[None], uncond[None], mask[None], umask[None]
    cu = jnp.concatenate([x, cond, mask], axis=-1)
    uu = jnp.concatenate([x, uncond, umask], axis=-1)
    rows = {"two_factor": [uu, cu, cu] if guidance.rows == 3 else [uu, cu, uu, cu],
            "local": [uu, cu], "global": [cu, cu], "none": [cu]}[guidance.mode]
    return jnp.stack(rows, axis=1).reshape((-1,) + cu.shape[1:])


def combine(eps: jax.Array, guidance: Guidance) -> jax.Array:
    """Guided eps ``(W, F, h, w, C)`` from the window-major U-Net rows, in the reference's evaluation order."""
    s_l, s_g = guidance.local_scale, guidance.global_scale
    r = guidance.unet_guidance
    e = eps.reshape((-1, r) + eps.shape[1:])
    mode = guidance.mode
    if mode == "two_factor":
        uu, cu, cc = e[:, 0], e[:, 1], e[:, r - 1]
        return uu + s_l * (cu - uu) + s_g * (cc - cu)
    if mode == "local":
        return e[:, 0] + s_l * (e[:, 1] - e[:, 0])
    if mode == "global":
        return e[:, 0] + s_g * (e[:, 1] - e[:, 0])
    return e[:, 0]


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
    """The jitted denoising loop of ``W`` windows: ``(unet_state, x_start, conditions, global latents, fps) -> z0``.

    Arrays carry a leading window axis: ``x_start (W, F, h, w, C)``, ``cond``/``uncond (W, F, h, w, C)``,
    ``mask``/``umask (W, F, h, w, 1)``, ``global_latents (W, g, hg, wg, 4)``, ``fps (W,)``; the one-window
    forms ``(F, ...)``, ``(g, hg, wg, 4)`` and a scalar fps are accepted too. With a ``mesh`` (one axis,
    ``"windows"``) the window axis is sharded over its devices (``W`` must be a multiple of their number) and
    the parameters are replicated.

    With ``report=True`` (default) the loop calls the host after every step (:func:`report_steps`); the cost
    is one tiny device-to-host transfer per step (measured in tests/test_api.py and bench/infer.py)."""

    def __init__(self, unet_graphdef: nnx.GraphDef, spec: SamplerSpec, guidance: Guidance = Guidance(),
                 report: bool = True, mesh: jax.sharding.Mesh | None = None):
        self.graphdef = unet_graphdef
        self.spec = spec
        self.guidance = guidance
        self.report = report
        self.mesh = mesh
        self.trace_count = 0
        if mesh is None:
            self._jit = jax.jit(self._denoise, donate_argnums=(1,))
        else:
            from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

            rep, win = NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh.axis_names[0]))
            self.window_sharding, self.replicated = win, rep
            self._jit = jax.jit(self._denoise, in_shardings=(rep,) + (win,) * 7, out_shardings=win,
                                donate_argnums=(1,))

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def _denoise(self, unet_state, x_start, cond, uncond, mask, umask, global_latents, fps):
        self.trace_count += 1  # runs at trace time only
        raw = self._raw_eps(unet_state, cond, uncond, mask, umask, global_latents, fps)

        def eps_fn(x, t):
            return combine(raw(x, t)[1], self.guidance).astype(x.dtype)

        return run_sampler(self.spec, eps_fn, x_start, on_step=_on_step if self.report else None)

    def _raw_eps(self, unet_state, cond, uncond, mask, umask, global_latents, fps):
        """``(x, t) -> (U-Net rows, raw U-Net output)`` for windows with these conditions; the global encoder's
        tokens are computed here, once, outside any denoising loop."""
        model = nnx.merge(self.graphdef, unet_state)
        g = self.guidance
        r = g.unet_guidance
        context = model.window_context(global_latents, g.global_rows)
        fps_rows = jnp.repeat(fps, r)

        def raw(x, t):
            rows = unet_rows(x, cond, uncond, mask, umask, g)
            return rows, model(rows, t, None, fps_rows, guidance=r, context=context)

        return raw

    def __call__(self, unet_state, x_start, cond, uncond, mask, umask, global_latents, fps):
        if cond.ndim == 4:  # one window
            cond, uncond, mask, umask = cond[None], uncond[None], mask[None], umask[None]
        nw = x_start.shape[0]
        if global_latents.ndim == 4:  # one video's global latents for every window
            global_latents = jnp.broadcast_to(global_latents[None], (nw,) + global_latents.shape)
        fps = jnp.broadcast_to(jnp.asarray(fps, jnp.float32).reshape(-1), (nw,))
        if nw % self.num_devices:
            raise ValueError(f"{nw} windows do not split over {self.num_devices} devices")
        return self._jit(unet_state, x_start, cond, uncond, mask, umask, global_latents, fps)

    def eps_fn_for_test(self, unet_state, cond, uncond, mask, umask, global_latents, fps):
        """``eps_fn(x, t) -> (rows, raw U-Net output)`` of one call, through the loop's code (tests)."""
        gl = global_latents[None] if global_latents.ndim == 4 else global_latents
        fps = jnp.broadcast_to(jnp.asarray(fps, jnp.float32).reshape(-1), (gl.shape[0],))
        return self._raw_eps(unet_state, cond, uncond, mask, umask, gl, fps)


def start_latent(z_init: jax.Array, eps0: jax.Array, spec: SamplerSpec, cfg: ScheduleConfig = ScheduleConfig()) -> jax.Array:
    """The SDEdit start: ``z_init`` noised to the sampler's start level (961 for the reference PLMS)."""
    return add_noise(z_init, eps0, spec.noise_timestep, jnp.asarray(alphas_cumprod(cfg)))


@functools.lru_cache(maxsize=16)
def _denoiser(graphdef: nnx.GraphDef, sampler: str, steps: int, guidance: Guidance, schedule: ScheduleConfig,
              report: bool = True, mesh=None) -> Denoiser:
    return Denoiser(graphdef, make_sampler(sampler, steps, schedule), guidance, report, mesh)


def build_denoiser(unet, sampler: str = "plms", steps: int = 50, guidance: Guidance = Guidance(),
                   schedule: ScheduleConfig = ScheduleConfig(), report: bool = True,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[Denoiser, nnx.State]:
    """Split the U-Net once and get its :class:`Denoiser`; returns ``(denoiser, unet_state)``.

    Denoisers are cached by (model structure, sampler, steps, guidance, schedule), so every
    :class:`~m3ddm_jax.outpaint.pipeline.Outpainter` over the same model shares one compiled loop per shape.
    """
    graphdef, state = nnx.split(unet)
    den = _denoiser(graphdef, sampler, steps, guidance, schedule, report, mesh)
    if mesh is not None:  # one replicated copy per model and mesh, shared by every setting
        per_model = _replicated.setdefault(unet, {})
        if mesh not in per_model:
            per_model[mesh] = jax.device_put(state, den.replicated)
        state = per_model[mesh]
    return den, state


_replicated: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


__all__ = ["Guidance", "assemble_conditions", "unet_rows", "combine", "Denoiser", "report_steps", "start_latent",
           "build_denoiser", "np"]
