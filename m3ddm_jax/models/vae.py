"""The Stable Diffusion 1.5 VAE (diffusers ``AutoencoderKL``) in Flax NNX, channels-last.

The module tree mirrors diffusers exactly (``encoder.down_blocks.0.resnets.1.conv1``,
``encoder.mid_block.attentions.0.to_out.0``, ``decoder.up_blocks.2.upsamplers.0.conv``, ...), so every Flax
variable path is the PyTorch state-dict key with ``kernel``/``scale`` in place of ``weight`` (see
:mod:`m3ddm_jax.interop.vae` for the conversion). Images are ``(N, H, W, C)`` floats, nominally in [-1, 1];
latents are ``(N, H/f, W/f, latent_channels)`` with ``f = 2 ** (len(block_out_channels) - 1)``.

Calls:

* ``model.encode(x)`` -> :class:`DiagonalGaussian` (``.mean``, ``.logvar``, ``.std``, ``.sample(key)``, ``.mode()``);
* ``model.decode(z)`` -> pixels (not clamped);
* ``model.encode_latents(x, key=None)`` / ``model.decode_latents(z)``: the same with the latent scaling of the
  diffusion model (``config.scaling_factor``, by default :data:`SCALING_FACTOR`) applied - the only place in
  the project where latents are scaled;
* :func:`encode_video` / :func:`decode_video`: ``(B, F, H, W, C)`` videos, frame by frame in fixed-size
  chunks through one cached ``jax.jit`` function.

Numerics follow diffusers: GroupNorm eps 1e-6 (statistics always in float32), SiLU, nearest x2 upsampling,
downsampling by a (0, 1, 0, 1) zero pad and a stride-2 3x3 convolution, single-head mid-block attention
through :func:`m3ddm_jax.models.attention.attention` with a residual connection, posterior log-variance
clipped to [-30, 20].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from m3ddm_jax.errors import ConfigError
from m3ddm_jax.models.attention import IMPLEMENTATIONS, attention
from m3ddm_jax.models.norms import GroupNorm as _GroupNorm

#: Latent scale of the Stable Diffusion 1.x VAE (latents fed to the U-Net are ``posterior * SCALING_FACTOR``).
#: The one definition in the project; everything else reads ``VAEConfig.scaling_factor``.
SCALING_FACTOR = 0.18215

GROUPNORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
_ACTIVATIONS = ("silu", "swish")  # diffusers maps both names to nn.SiLU


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` ``config.json``; defaults are diffusers' constructor defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = SCALING_FACTOR
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size",
                     "latents_mean", "latents_std"):
            if isinstance(getattr(self, name), list):  # keep the config hashable (it is static in jit)
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def sd15(cls) -> "VAEConfig":
        """The Stable Diffusion 1.5 VAE (83,653,863 parameters)."""
        n = 4
        return cls(
            down_block_types=(_DOWN_BLOCK,) * n,
            up_block_types=(_UP_BLOCK,) * n,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=512,
        )

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        """Build from a diffusers ``config.json`` dict; private ``_...`` entries are skipped, unknown fields are refused."""
        cls_name = cfg.get("_class_name")
        if cls_name is not None and cls_name != "AutoencoderKL":
            raise ConfigError(f"VAE config field '_class_name' is {cls_name!r}; only 'AutoencoderKL' is supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in cfg.items():
            if key.startswith("_"):
                continue
            if key not in names:
                raise ConfigError(f"VAE config field {key!r} is not an AutoencoderKL field this implementation knows")
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        if kwargs.get("scaling_factor", 0) is None:
            kwargs.pop("scaling_factor")
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - guarded by the field check above
            raise ConfigError(f"bad VAE config: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """The diffusers ``config.json`` dict (with ``_class_name``), JSON-ready."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    # -- checks ------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"VAE config field {field!r} = {getattr(self, field)!r}: {why}")

        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        chans = self.block_out_channels
        if not isinstance(chans, (tuple, list)) or not chans or not all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c > 0 for c in chans
        ):
            raise bad("block_out_channels", "must be a non-empty list of positive integers")
        for c in chans:
            if c % self.norm_num_groups:
                raise bad("norm_num_groups", f"does not divide block channel count {c}")
        if tuple(self.down_block_types) != (_DOWN_BLOCK,) * len(chans):
            raise bad("down_block_types", f"must be {len(chans)} x {_DOWN_BLOCK!r} (one per block_out_channels entry)")
        if tuple(self.up_block_types) != (_UP_BLOCK,) * len(chans):
            raise bad("up_block_types", f"must be {len(chans)} x {_UP_BLOCK!r} (one per block_out_channels entry)")
        if self.act_fn not in _ACTIVATIONS:
            raise bad("act_fn", "only 'silu' is supported")
        if not isinstance(self.scaling_factor, (int, float)) or isinstance(self.scaling_factor, bool) or not (
            self.scaling_factor > 0
        ):
            raise bad("scaling_factor", "must be a positive number")
        for name in ("shift_factor", "latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                raise bad(name, "latent shifting/standardisation is not supported (SD-1.5 VAEs use scaling only)")
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        ss = self.sample_size
        if not (isinstance(ss, int) or (isinstance(ss, tuple) and all(isinstance(s, int) for s in ss))):
            raise bad("sample_size", "must be an integer or a list of integers")

    @property
    def downscale(self) -> int:
        """Spatial factor between pixels and latents."""
        return 2 ** (len(self.block_out_channels) - 1)


def as_vae_config(config: VAEConfig | Mapping[str, Any]) -> VAEConfig:
    return config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)


# --------------------------------------------------------------------------------------------------
# Posterior
# --------------------------------------------------------------------------------------------------

@struct.dataclass
class DiagonalGaussian:
    """The VAE posterior: a diagonal Gaussian with ``mean`` and clipped ``logvar`` (channels-last, float32)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split ``(..., 2C)`` encoder moments into mean (first C) and log-variance, clipped like diffusers."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * eps`` with ``eps ~ N(0, 1)`` drawn from ``key`` for the whole batch."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def sample_per_item(self, keys: jax.Array) -> jax.Array:
        """Like :meth:`sample` with one key per leading item (so item ``i``'s draw does not depend on the batch)."""
        eps = jax.vmap(lambda k: jax.random.normal(k, self.mean.shape[1:], self.mean.dtype))(keys)
        return self.mean + self.std * eps

    def kl(self) -> jax.Array:
        """KL divergence to N(0, 1), summed over all but the leading axis."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------

class GroupNorm(_GroupNorm):
    """``torch.nn.GroupNorm`` on channels-last input (the project's one group norm), VAE eps by default."""

    def __init__(self, num_channels: int, num_groups: int, eps: float = GROUPNORM_EPS, *, param_dtype=jnp.float32):
        super().__init__(num_channels, num_groups, eps, param_dtype=param_dtype)


def _conv(cin: int, cout: int, k: int, *, dtype, param_dtype, rngs: nnx.Rngs, stride: int = 1, padding=None) -> nnx.Conv:
    if padding is None:
        padding = ((k // 2, k // 2),) * 2
    return nnx.Conv(
        cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=padding,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: norm-SiLU-conv twice plus a (1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(cin, groups, param_dtype=param_dtype)
        self.conv1 = _conv(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(cout, groups, param_dtype=param_dtype)
        self.conv2 = _conv(cout, cout, 3, **kw)
        self.conv_shortcut = _conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Zero pad bottom/right by one, then a 3x3 stride-2 convolution (diffusers ``padding=0`` variant)."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class VAEAttention(nnx.Module):
    """The mid-block self-attention: GroupNorm, single-head q/k/v attention, output projection, residual."""

    def __init__(self, channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 attention_impl: str = "xla", query_chunk: int | None = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = GroupNorm(channels, groups, param_dtype=param_dtype)
        self.to_q = nnx.Linear(channels, channels, **kw)
        self.to_k = nnx.Linear(channels, channels, **kw)
        self.to_v = nnx.Linear(channels, channels, **kw)
        self.to_out = nnx.List([nnx.Linear(channels, channels, **kw)])
        self.attention_impl = attention_impl
        self.query_chunk = query_chunk
        self.rescale_output_factor = 1.0

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(n, h * w, c)
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), heads=1,
                        impl=self.attention_impl, query_chunk=self.query_chunk)
        out = self.to_out[0](out).reshape(n, h, w, c)
        return (out + x) / self.rescale_output_factor


class UNetMidBlock2D(nnx.Module):
    """resnet, (attention), resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, dtype, param_dtype, rngs: nnx.Rngs,
                 attention_impl: str = "xla", query_chunk: int | None = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])
        self.attentions = nnx.List(
            [VAEAttention(channels, groups, attention_impl=attention_impl, query_chunk=query_chunk, **kw)]
            if add_attention else []
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_downsample: bool, *,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(num_layers)]
        )
        self.downsamplers = nnx.List([Downsample2D(cout, **kw)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_upsample: bool, *,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(num_layers)]
        )
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x


class Encoder(nnx.Module):
    """pixels -> ``2 * latent_channels`` moments (before ``quant_conv``)."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention_impl: str, query_chunk):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, chans[0], 3, **kw)
        blocks = []
        cout = chans[0]
        for i, c in enumerate(chans):
            cin, cout = cout, c
            blocks.append(DownEncoderBlock2D(cin, cout, cfg.layers_per_block, groups,
                                             add_downsample=i != len(chans) - 1, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(chans[-1], groups, cfg.mid_block_add_attention,
                                        attention_impl=attention_impl, query_chunk=query_chunk, **kw)
        self.conv_norm_out = GroupNorm(chans[-1], groups, param_dtype=param_dtype)
        self.conv_out = _conv(chans[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """latents (after ``post_quant_conv``) -> pixels."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention_impl: str, query_chunk):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        rev = list(reversed(chans))
        self.conv_in = _conv(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(rev[0], groups, cfg.mid_block_add_attention,
                                        attention_impl=attention_impl, query_chunk=query_chunk, **kw)
        blocks = []
        cout = rev[0]
        for i, c in enumerate(rev):
            cin, cout = cout, c
            blocks.append(UpDecoderBlock2D(cin, cout, cfg.layers_per_block + 1, groups,
                                           add_upsample=i != len(rev) - 1, **kw))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(chans[0], groups, param_dtype=param_dtype)
        self.conv_out = _conv(chans[0], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------

class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL`` (SD-1.x family), channels-last.

    ``dtype`` is the computation dtype of the convolutions and projections (``None``: follow the inputs and
    parameters), ``param_dtype`` the dtype of freshly initialised parameters. GroupNorm statistics and the
    attention softmax are float32 whatever the dtype; the posterior is returned in float32.
    """

    def __init__(
        self,
        config: VAEConfig | Mapping[str, Any],
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
        query_chunk: int | None = None,
    ):
        cfg = as_vae_config(config)
        if attention_impl not in IMPLEMENTATIONS:
            raise ConfigError(f"attention_impl {attention_impl!r} is not one of {IMPLEMENTATIONS}")
        self.config = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(cfg, attention_impl=attention_impl, query_chunk=query_chunk, **kw)
        self.decoder = Decoder(cfg, attention_impl=attention_impl, query_chunk=query_chunk, **kw)
        lc = cfg.latent_channels
        self.quant_conv = _conv(2 * lc, 2 * lc, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = _conv(lc, lc, 1, **kw) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """``(N, H, W, in_channels)`` pixels -> posterior over ``(N, H/f, W/f, latent_channels)`` latents."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents ``(N, h, w, latent_channels)`` -> pixels ``(N, h*f, w*f, out_channels)`` (not clamped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_latents(self, x: jax.Array, key: jax.Array | None = None, *, per_item_keys: jax.Array | None = None) -> jax.Array:
        """Diffusion-model latents: ``posterior.sample(key) * scaling_factor`` (``mode()`` if no key).

        ``per_item_keys`` (one key per leading item) replaces ``key`` where each image's draw must not depend
        on the batch it was encoded in (see :func:`encode_video`).
        """
        dist = self.encode(x)
        if per_item_keys is not None:
            z = dist.sample_per_item(per_item_keys)
        elif key is not None:
            z = dist.sample(key)
        else:
            z = dist.mode()
        return z * self.config.scaling_factor

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """Inverse of :meth:`encode_latents`: ``decode(z / scaling_factor)``."""
        return self.decode(z / self.config.scaling_factor)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction, as diffusers' ``forward``: decode the posterior sample (``key``) or mode."""
        dist = self.encode(x)
        z = dist.mode() if key is None else dist.sample(key)
        return self.decode(z)


def vae_from_config(
    config: VAEConfig | Mapping[str, Any],
    rngs: nnx.Rngs | int = 0,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    attention_impl: str = "xla",
    query_chunk: int | None = None,
) -> AutoencoderKL:
    """A randomly initialised :class:`AutoencoderKL` (tests, training from scratch)."""
    if not isinstance(rngs, nnx.Rngs):
        rngs = nnx.Rngs(rngs)
    return AutoencoderKL(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         attention_impl=attention_impl, query_chunk=query_chunk)


# --------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------

VAELike = Any  # an AutoencoderKL, or its ``(graphdef, state)`` from ``nnx.split``


def _split(vae: VAELike) -> tuple[nnx.GraphDef, nnx.State]:
    if isinstance(vae, AutoencoderKL):
        return nnx.split(vae)
    if isinstance(vae, tuple) and len(vae) == 2:
        return vae
    raise TypeError(f"expected an AutoencoderKL or its (graphdef, state), got {type(vae).__name__}")


@functools.partial(jax.jit, static_argnums=0)
def _encode_chunk(graphdef, state, x, key, frame_index):
    model = nnx.merge(graphdef, state)
    keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(frame_index)
    return model.encode_latents(x, per_item_keys=keys)


@functools.partial(jax.jit, static_argnums=0)
def _decode_chunk(graphdef, state, z):
    return nnx.merge(graphdef, state).decode_latents(z)


def _chunked(fn, frames, chunk: int):
    """Run ``fn(chunk_frames, chunk_start)`` over ``frames`` (N, ...) in ``chunk``-sized, zero-padded pieces."""
    n = frames.shape[0]
    outs = []
    for start in range(0, n, chunk):
        piece = frames[start:start + chunk]
        if piece.shape[0] < chunk:
            pad = [(0, chunk - piece.shape[0])] + [(0, 0)] * (piece.ndim - 1)
            piece = np.pad(np.asarray(piece), pad) if isinstance(piece, np.ndarray) else jnp.pad(piece, pad)
        outs.append(fn(piece, start))
    return jnp.concatenate(outs, axis=0)[:n]


def _check_video(frames, what: str) -> None:
    if getattr(frames, "ndim", None) != 5:
        raise ValueError(f"{what}: expected (B, F, H, W, C), got shape {getattr(frames, 'shape', None)}")


def encode_video(vae: VAELike, frames, key: jax.Array | None = None, chunk: int = 16) -> jax.Array:
    """``(B, F, H, W, C)`` frames in [-1, 1] -> scaled latents ``(B, F, H/f, W/f, latent_channels)``.

    Frames go through the encoder ``chunk`` at a time (the last chunk zero-padded, so one compiled shape);
    with ``key`` each frame's posterior sample uses ``fold_in(key, b * F + f)``, so the result does not
    depend on ``chunk``; without it the posterior mode is used. The jitted function is cached per model
    structure and shape: repeated calls do not recompile.
    """
    _check_video(frames, "encode_video")
    if chunk < 1:
        raise ValueError(f"encode_video: chunk must be positive, got {chunk}")
    graphdef, state = _split(vae)
    b, f = frames.shape[:2]
    flat = frames.reshape(b * f, *frames.shape[2:])
    base = jnp.arange(chunk, dtype=jnp.int32)
    out = _chunked(lambda x, start: _encode_chunk(graphdef, state, x, key, base + start), flat, chunk)
    return out.reshape(b, f, *out.shape[1:])


def decode_video(vae: VAELike, latents, chunk: int = 16) -> jax.Array:
    """Scaled latents ``(B, F, h, w, latent_channels)`` -> pixels ``(B, F, h*f, w*f, C)`` (not clamped).

    Inverse of :func:`encode_video`; frames are decoded ``chunk`` at a time through one cached jitted function.
    """
    _check_video(latents, "decode_video")
    if chunk < 1:
        raise ValueError(f"decode_video: chunk must be positive, got {chunk}")
    graphdef, state = _split(vae)
    b, f = latents.shape[:2]
    flat = latents.reshape(b * f, *latents.shape[2:])
    out = _chunked(lambda z, start: _decode_chunk(graphdef, state, z), flat, chunk)
    return out.reshape(b, f, *out.shape[1:])
