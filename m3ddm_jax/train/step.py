"""The jitted training and validation steps (pure functions of explicit state).

One train step, inside ONE ``jax.jit`` (spec 6.4-6.5, 4.2):

1. pixels ``uint8 -> [-1, 1]``; per sample (key ``fold_in(step_key, i)`` with ``i`` the global batch index, so
   the draws do not depend on how the batch is sharded): the training mask (M3DDM+ uniform or M3DDM per-frame,
   with the frame cases), optional condition dropout (local: black frames + all-ones mask; global: zero
   latents), ``t ~ U{0..999}``, ``eps ~ N(0, I)``;
2. frozen VAE: posterior samples x the VAE scaling factor of the clip, the masked clip (masked pixels = -1, black) and the
   global frames (``stop_gradient``);
3. ``x_t = add_noise(z, eps, t)``; U-Net input ``[x_t | z_masked | mask[::8, ::8]]``; the U-Net predicts ``eps``;
4. loss = MSE over all latent elements (reference) or over the masked latents only (``loss = "masked"``);
5. gradients, optax update (Adam / AdamW, optional clipping, gradient accumulation through
   ``optax.MultiSteps``), optional EMA of the parameters, BatchNorm statistics carried out.

BatchNorm (the global encoder's, spec 1.9 and 9.9) is selected by ``batchnorm``:

* ``"per_video"`` (reference semantics for any batch size): the U-Net is vmapped over the videos, so each
  video's 16 global latents form one BatchNorm batch, as with the reference's batch of 1; the running
  statistics move by the mean of the per-video updates;
* ``"batch"``: one BatchNorm batch over all global latents of the (global) batch;
* ``"frozen"``: running statistics (inference behaviour; nothing drifts; scale/bias still train).

State is a pytree of plain arrays: ``{"params", "batch_stats", "opt_state", "ema", "step", "rng"}``
(``params``/``batch_stats`` are ``nnx`` pure dicts of the U-Net).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from m3ddm_jax import masks as M
from m3ddm_jax.diffusion import add_noise, alphas_cumprod
from m3ddm_jax.errors import ConfigError

BATCHNORM_MODES = ("per_video", "batch", "frozen")
LOSS_MODES = ("all", "masked")
NUM_TRAIN_TIMESTEPS = 1000


@dataclasses.dataclass(frozen=True)
class StepConfig:
    mask_mode: str = "uniform"
    mask_probs: tuple = M.UNIFORM_PROBS_PAPER
    width_range: tuple = M.WIDTH_RANGE
    frame_case_probs: tuple = M.FRAME_CASE_PROBS
    p_frame: float = 0.5
    drop_local: float = 0.0
    drop_global: float = 0.0
    mask_global: bool = False
    loss: str = "all"
    batchnorm: str = "per_video"
    grad_accum: int = 1
    ema_decay: float = 0.0
    latent_factor: int = 8

    def validate(self) -> None:
        if self.mask_mode not in ("uniform", "per_frame"):
            raise ConfigError(f"mask.mode must be 'uniform' or 'per_frame', got {self.mask_mode!r}")
        if self.loss not in LOSS_MODES:
            raise ConfigError(f"train.loss must be one of {LOSS_MODES}, got {self.loss!r}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ConfigError(f"model.batchnorm must be one of {BATCHNORM_MODES}, got {self.batchnorm!r}")
        for name in ("drop_local", "drop_global", "p_frame"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"mask.{name} must be a probability, got {v}")
        if self.mask_global and self.mask_mode != "uniform":
            raise ConfigError("mask.mask_global needs mask.mode = 'uniform' (one spatial mask per clip)")
        if self.grad_accum < 1:
            raise ConfigError("train.grad_accum must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        probs_n = 3 if self.mask_mode == "uniform" else 5
        M._check_probs(self.mask_probs, probs_n, "mask.probs")
        M._check_probs(self.frame_case_probs, 3, "mask.frame_case_probs")
        M._check_range(self.width_range)


def make_optimizer(name: str = "adam", learning_rate: float = 1e-5, *, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, clip_norm: float = 0.0, warmup_steps: int = 0,
                   grad_accum: int = 1) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, schedule)``: Adam (the paper) or AdamW (the reference code: weight decay 0.01), constant
    learning rate after an optional linear warm-up, optional global-norm clipping, gradient accumulation
    over ``grad_accum`` micro-steps (``optax.MultiSteps``). ``schedule(update_count)`` gives the rate."""
    if learning_rate <= 0:
        raise ConfigError(f"optim.lr must be positive, got {learning_rate}")
    if warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
        schedule = optax.join_schedules([schedule, optax.constant_schedule(learning_rate)], [warmup_steps])
    else:
        schedule = optax.constant_schedule(learning_rate)
    chain = []
    if clip_norm and clip_norm > 0:
        chain.append(optax.clip_by_global_norm(clip_norm))
    if name == "adam":
        chain.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
    elif name == "adamw":
        chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    else:
        raise ConfigError(f"optim.name must be 'adam' or 'adamw', got {name!r}")
    tx = optax.chain(*chain)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    return tx, schedule


class StepFns:
    """Builds the pure step functions for one U-Net / VAE structure and step configuration."""

    def __init__(self, unet_graphdef, vae_graphdef, tx: optax.GradientTransformation, schedule: Callable,
                 cfg: StepConfig):
        cfg.validate()
        self.unet_graphdef = unet_graphdef
        self.vae_graphdef = vae_graphdef
        self.tx = tx
        self.schedule = schedule
        self.cfg = cfg
        self.abar = np.asarray(alphas_cumprod(), np.float32)

    # -- inputs --------------------------------------------------------------------------------------
    def _sample_draws(self, key, num_frames: int, size: int, gsize: int, latent_shape):
        cfg = self.cfg
        km, kt, ke, kv, kd = jax.random.split(key, 5)
        mask = M.training_mask(km, num_frames, size, size, mode=cfg.mask_mode, probs=cfg.mask_probs,
                               width_range=cfg.width_range, frame_case_probs=cfg.frame_case_probs,
                               p_frame=cfg.p_frame)
        kl, kg = jax.random.split(kd)
        drop_local = jax.random.bernoulli(kl, cfg.drop_local)
        drop_global = jax.random.bernoulli(kg, cfg.drop_global)
        mask = jnp.where(drop_local, 1.0, mask)
        if cfg.mask_global:
            ks, _ = jax.random.split(km)  # the spatial key of training_mask
            _, sides, ratio = M.sample_uniform_params(ks, cfg.mask_probs, cfg.width_range)
            gmask = M.sides_mask(gsize, gsize, sides, ratio)
        else:
            gmask = jnp.zeros((gsize, gsize), jnp.float32)
        t = jax.random.randint(kt, (), 0, NUM_TRAIN_TIMESTEPS)
        eps = jax.random.normal(ke, latent_shape, jnp.float32)
        return mask, gmask, drop_global, t, eps, kv

    def prepare(self, vae_state, batch, key):
        """Model inputs from a pixel batch: ``(unet_input, t, global_latents (B,G,hg,wg,4), fps, eps, weight)``."""
        frames, gframes = batch["frames"], batch["global_frames"]
        b, f, s = frames.shape[0], frames.shape[1], frames.shape[2]
        g, gs = gframes.shape[1], gframes.shape[2]
        lf = self.cfg.latent_factor
        if s % lf or gs % lf:
            raise ConfigError(f"data.size and data.global_size must be multiples of the VAE factor {lf}")
        latent_shape = (f, s // lf, s // lf, 4)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
        mask, gmask, drop_global, t, eps, kv = jax.vmap(
            lambda k: self._sample_draws(k, f, s, gs, latent_shape))(keys)

        x = frames.astype(jnp.float32) / 127.5 - 1.0
        masked = jnp.where(mask[..., None] > 0, -1.0, x)
        gx = gframes.astype(jnp.float32) / 127.5 - 1.0
        gx = jnp.where(gmask[:, None, :, :, None] > 0, -1.0, gx)

        vae = nnx.merge(self.vae_graphdef, vae_state)
        kc, km_, kg = jax.vmap(lambda k: jax.random.split(k, 3), out_axes=1)(kv)
        def per_frame(ks, n):  # (B,) keys -> (B, n) keys, one per image
            return jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))(ks)

        def enc(imgs, ks):  # (B, n, H, W, 3) -> (B, n, H/8, W/8, 4) posterior samples x scaling factor
            bb, n = imgs.shape[:2]
            zz = vae.encode_latents(imgs.reshape(bb * n, *imgs.shape[2:]), per_item_keys=ks.reshape(-1))
            return zz.reshape(bb, n, *zz.shape[1:]).astype(jnp.float32)

        z = enc(x, per_frame(kc, f))
        zm = enc(masked, per_frame(km_, f))
        gz = enc(gx, per_frame(kg, g))
        z, zm, gz = jax.lax.stop_gradient((z, zm, gz))
        gz = jnp.where(drop_global[:, None, None, None, None], 0.0, gz)

        x_t = add_noise(z, eps, t, jnp.asarray(self.abar))
        m_lat = M.latent_mask(mask, lf)[..., None]
        unet_in = jnp.concatenate([x_t, zm, m_lat], axis=-1)
        weight = jnp.broadcast_to(m_lat, eps.shape) if self.cfg.loss == "masked" else jnp.ones_like(eps)
        return unet_in, t, gz, batch["fps"], eps, weight

    # -- forward -------------------------------------------------------------------------------------
    def predict(self, params, batch_stats, unet_in, t, gz, fps, *, train_bn: bool):
        """``(eps_hat (B,F,h,w,4) float32, new batch_stats)``."""
        gd = self.unet_graphdef
        mode = self.cfg.batchnorm if train_bn else "frozen"
        if mode == "per_video":
            def one(xi, ti, gi, fi):
                m = nnx.merge(gd, params, batch_stats)
                out = m(xi[None], ti[None], gi, fi[None], guidance=1, train=True)
                return out[0].astype(jnp.float32), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

            out, stats = jax.vmap(one)(unet_in, t, gz, fps)
            new_stats = jax.tree.map(
                lambda s: s.mean(0).astype(s.dtype) if jnp.issubdtype(s.dtype, jnp.floating) else s[0], stats)
            return out, new_stats
        m = nnx.merge(gd, params, batch_stats)
        out = m(unet_in, t, gz.reshape(-1, *gz.shape[2:]), fps, guidance=1, train=(mode == "batch"))
        new_stats = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)) if mode == "batch" else batch_stats
        return out.astype(jnp.float32), new_stats

    @staticmethod
    def mse(eps_hat, eps, weight):
        """``(sum of weighted squared errors, sum of weights)``."""
        d2 = jnp.square(eps_hat - eps) * weight
        return jnp.sum(d2), jnp.sum(weight)

    # -- steps ---------------------------------------------------------------------------------------
    def train_step(self, state: dict, vae_state, batch: dict, draw_step=None) -> tuple[dict, dict]:
        """One step. ``draw_step`` (default: the state's step) selects the random draws (masks, t, noise,
        VAE samples); holding it fixed (``train.repeat_noise``) is the classic overfitting check."""
        cfg = self.cfg
        step = state["step"]
        draw_step = step if draw_step is None else draw_step
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), draw_step)
        unet_in, t, gz, fps, eps, weight = self.prepare(vae_state, batch, key)

        def loss_fn(params):
            eps_hat, new_stats = self.predict(params, state["batch_stats"], unet_in, t, gz, fps, train_bn=True)
            num, den = self.mse(eps_hat, eps, weight)
            return num / jnp.maximum(den, 1.0), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, params=params, batch_stats=new_stats, opt_state=opt_state, step=step + 1)
        updated = ((step + 1) % cfg.grad_accum) == 0
        if state.get("ema") is not None:
            d = cfg.ema_decay
            new["ema"] = jax.tree.map(lambda e, p: jnp.where(updated, d * e + (1 - d) * p.astype(e.dtype), e),
                                      state["ema"], params)
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "lr": jnp.asarray(self.schedule(step // cfg.grad_accum), jnp.float32),
                   "t_mean": jnp.mean(t.astype(jnp.float32))}
        return new, metrics

    def eval_step(self, params, batch_stats, vae_state, batch, key) -> tuple[jax.Array, jax.Array]:
        """Validation: the same random loss with a fixed key, BatchNorm in eval mode (the reference's
        validation runs the model in eval mode). Returns ``(sum of squared errors, sum of weights)``."""
        unet_in, t, gz, fps, eps, weight = self.prepare(vae_state, batch, key)
        eps_hat, _ = self.predict(params, batch_stats, unet_in, t, gz, fps, train_bn=False)
        return self.mse(eps_hat, eps, weight)


def init_state(params, batch_stats, tx: optax.GradientTransformation, *, seed: int, ema: bool) -> dict:
    """A fresh training state (``params``/``batch_stats``: pure dicts of arrays)."""
    return {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "ema": jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params) if ema else None,
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def state_shardings(state_shapes: dict, shardings) -> dict:
    """Shardings of the train state: parameter-shaped leaves by the fsdp rule, the rest replicated."""
    out = {}
    for k, v in state_shapes.items():
        if k in ("params", "ema", "opt_state"):
            out[k] = None if v is None else shardings.params_tree(v)
        else:
            out[k] = None if v is None else shardings.replicated_tree(v)
    return out

