"""The scaled-linear noise schedule of Stable Diffusion 1.x and ``add_noise``.

``beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)**2`` and ``abar_t = prod_{s<=t} (1 - beta_s)``,
computed as the reference (diffusers on PyTorch) does, so ``abar`` is bit-identical to its table.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from m3ddm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The fields of a diffusers ``scheduler_config.json`` that the samplers use (SD-1.5 values)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"

    @classmethod
    def from_dict(cls, cfg: dict) -> "ScheduleConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in cfg.items() if k in fields})
        if out.beta_schedule not in ("scaled_linear", "linear"):
            raise ConfigError(f"scheduler: beta_schedule {out.beta_schedule!r} is not supported (scaled_linear, linear)")
        if out.prediction_type != "epsilon":
            raise ConfigError(f"scheduler: prediction_type {out.prediction_type!r} is not supported (epsilon)")
        if out.timestep_spacing != "leading":
            raise ConfigError(f"scheduler: timestep_spacing {out.timestep_spacing!r} is not supported (leading)")
        return out


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 ``linspace`` bit-identical to PyTorch's CPU kernel (fused multiply-add from both ends)."""
    s, e = np.float32(start), np.float32(end)
    step = (e - s) / np.float32(max(n - 1, 1))
    i = np.arange(n)
    lo = np.float64(s) + np.float64(step) * i
    hi = np.float64(e) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def betas(cfg: ScheduleConfig = ScheduleConfig()) -> np.ndarray:
    if cfg.beta_schedule == "scaled_linear":
        root = _linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps)
        return root * root
    return _linspace_f32(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)


def alphas_cumprod(cfg: ScheduleConfig = ScheduleConfig()) -> np.ndarray:
    """``abar_t`` for t = 0..T-1 as float32.

    The product is accumulated in float64 and rounded once, as PyTorch's CPU ``cumprod`` does for float32
    (the reference's table); a float32 running product drifts by ~3e-7.
    """
    return np.cumprod((np.float32(1.0) - betas(cfg)).astype(np.float64)).astype(np.float32)


def final_alpha_cumprod(cfg: ScheduleConfig = ScheduleConfig()) -> np.float32:
    """``abar`` used for a previous timestep below 0 (1.0, or ``abar_0`` when ``set_alpha_to_one`` is false)."""
    return np.float32(1.0) if cfg.set_alpha_to_one else alphas_cumprod(cfg)[0]


def add_noise(x0: jnp.ndarray, eps: jnp.ndarray, t, abar: jnp.ndarray) -> jnp.ndarray:
    """``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; ``t`` a scalar or one timestep per batch row."""
    a = jnp.asarray(abar)[jnp.asarray(t)]
    a = a.reshape(a.shape + (1,) * (x0.ndim - a.ndim))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
