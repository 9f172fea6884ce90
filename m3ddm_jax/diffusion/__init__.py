"""Noise schedules and samplers as pure JAX functions (state passed in and out)."""
from m3ddm_jax.diffusion.schedule import ScheduleConfig, add_noise, alphas_cumprod
from m3ddm_jax.diffusion.samplers import SAMPLERS, SamplerSpec, make_sampler

__all__ = ["ScheduleConfig", "add_noise", "alphas_cumprod", "SAMPLERS", "SamplerSpec", "make_sampler"]
