"""Building blocks of the M3DDM 3D U-Net (Flax NNX, channels-last).

Every layer that holds a PyTorch-mirrored weight records ``torch_rank``: the rank of its weight tensor in the
PyTorch model. The key table (``m3ddm_jax.interop.unet``) reads it to re-insert the size-1 kernel dimensions
that the Flax layer does not have (a ``(1, 3, 3)`` Conv3d is a 2-D conv over ``B*F`` frames here, a 1x1x1
Conv3d or 1x1 Conv2d a :class:`Linear`).

Video tensors are ``(B, F, H, W, C)``. Compute precision is set by :class:`ComputeOptions`: ``dtype`` is the
compute dtype of matmuls and convolutions (``None``: the parameters' dtype); normalisation statistics,
softmax and sinusoidal embeddings are always computed in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.models.norms import group_norm

Array = jax.Array
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ComputeOptions:
    """Static compute settings shared by every layer of a model (part of its graph definition).

    * ``dtype``: compute dtype (e.g. ``jnp.bfloat16``); ``None`` computes in the parameters' dtype.
    * ``precision``: ``jax.lax.Precision`` for matmuls/convolutions (``None``: backend default).
    * ``attention_impl``: ``"xla"`` | ``"dot_product"`` | ``"cudnn"`` (see :mod:`m3ddm_jax.models.attention`).
    * ``attention_budget_mib``: with the ``"xla"`` implementation, queries are processed in chunks so that
      one chunk's float32 score tensor ``(B, H, chunk, Lk)`` stays below this many MiB; ``None``: never
      chunk; ``"auto"`` (default): ``AUTO_BUDGET_MIB * clip(head_dim / 32, 1/8, 4)``. Measured on CPU:
      narrow heads are bound by the passes over the scores and want cache-sized chunks (head dim 8: a
      16 MiB chunk is ~30% faster than 128 MiB), wide heads by the two matmuls and want long chunks
      (head dim 40: 512 MiB ~10% faster than 128 MiB).
    * ``remat``: rematerialise each ResNet and each transformer in the backward pass (training).
    """

    dtype: Any = None
    precision: Any = None
    attention_impl: str = "xla"
    attention_budget_mib: float | str | None = "auto"
    remat: bool = False

    def out_dtype(self, x: Array):
        return self.dtype if self.dtype is not None else x.dtype

    def compute_dtype(self, *xs: Array):
        """The dtype a matmul/conv of ``xs`` runs in: ``dtype`` if set, else the promoted input dtype."""
        if self.dtype is not None:
            return self.dtype
        return jnp.result_type(*(x.dtype for x in xs))


DEFAULT_OPTIONS = ComputeOptions()
AUTO_BUDGET_MIB = 128.0


# -- initialisers (PyTorch defaults, used only for random initialisation) ------------------------------

class KeySource:
    """Per-parameter random sources (duck-types ``nnx.Rngs.params()``).

    * Concrete base key (eager construction): each draw is a ``numpy.random.Generator`` seeded with
      (key data, counter), and the initialisers fill parameters on the host. Eager ``jax.random`` calls
      would compile one small XLA program per distinct parameter shape (~25 s for the tiny model) and
      jitting the whole constructor takes minutes.
    * Traced base key (``nnx.eval_shape`` / ``jit``): ``jax.random.fold_in(key, counter)``. Drawing from an
      ``nnx.Rngs`` mutates a Variable per draw, which under ``eval_shape`` of a 1,500-tensor model costs
      time quadratic in the number of draws; a counter does not.
    """

    def __init__(self, rngs):
        self.key = rngs.params() if hasattr(rngs, "params") else rngs
        self.count = 0
        self.host_seed = None
        if not isinstance(self.key, jax.core.Tracer):
            data = jax.random.key_data(self.key) if jnp.issubdtype(self.key.dtype, jax.dtypes.prng_key) else self.key
            self.host_seed = [int(v) for v in np.asarray(data).ravel()]

    def params(self):
        self.count += 1
        if self.host_seed is not None:
            return np.random.default_rng(self.host_seed + [self.count])
        return jax.random.fold_in(self.key, self.count)


def draw_key(rngs):
    """The next parameter key of ``rngs`` (``nnx.Rngs`` or :class:`KeySource`); a concrete JAX key becomes a
    host ``numpy.random.Generator`` (see :class:`KeySource`)."""
    key = rngs.params()
    if isinstance(key, (np.random.Generator, jax.core.Tracer)):
        return key
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng([int(v) for v in np.asarray(data).ravel()])


def _on_host(key) -> bool:
    return isinstance(key, np.random.Generator)


def _host_array(a: np.ndarray, dtype) -> Array:
    return jnp.asarray(np.asarray(a, dtype=np.float32).astype(jnp.dtype(dtype)))


def torch_uniform(fan_in: int) -> Callable:
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=F32):
        if _on_host(key):
            return _host_array((key.random(shape, dtype=np.float32) * 2 - 1) * np.float32(bound), dtype)
        return jax.random.uniform(key, shape, F32, -bound, bound).astype(dtype)

    return init


def zeros_init(key, shape, dtype=F32):
    return _host_array(np.zeros(shape), dtype) if _on_host(key) else jnp.zeros(shape, dtype)


def identity_init(key, shape, dtype=F32):
    """Identity (Dirac) kernel of a Linear ``(C, C)``: torch's ``nn.init.dirac_`` of a 1x1(x1) conv."""
    return _host_array(np.eye(shape[0], shape[1]), dtype) if _on_host(key) else jnp.eye(shape[0], shape[1], dtype=dtype)


def dirac_temporal_init(key, shape, dtype=F32):
    """``nn.init.dirac_`` of a Conv1d weight, in the Flax layout ``(k, C, C)``: centre tap = identity."""
    k, ci, co = shape
    if _on_host(key):
        w = np.zeros(shape, np.float32)
        w[k // 2] = np.eye(ci, co, dtype=np.float32)
        return _host_array(w, dtype)
    return jnp.zeros(shape, dtype).at[k // 2].set(jnp.eye(ci, co, dtype=dtype))


def const_vector(n: int, value: float, dtype=F32) -> Array:
    """A constant parameter vector created on the host (no per-shape XLA compile when eager)."""
    return jnp.asarray(np.full((n,), value, dtype=np.float32).astype(jnp.dtype(dtype)))


def silu(x: Array) -> Array:
    return jax.nn.silu(x)


# -- parameter layers ---------------------------------------------------------------------------------

class Linear(nnx.Module):
    """``y = x @ kernel + bias`` over the last axis; kernel ``(I, O)``.

    Also stands for 1x1 Conv2d (``torch_rank=4``) and 1x1x1 Conv3d (``torch_rank=5``) layers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        torch_rank: int = 2,
        kernel_init: Callable | None = None,
        bias_init: Callable | None = None,
        opts: ComputeOptions = DEFAULT_OPTIONS,
        param_dtype=F32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.torch_rank = torch_rank
        self.opts = opts
        kinit = kernel_init or torch_uniform(in_features)
        self.kernel = nnx.Param(kinit(draw_key(rngs), (in_features, out_features), param_dtype))
        self.bias = (
            nnx.Param((bias_init or torch_uniform(in_features))(draw_key(rngs), (out_features,), param_dtype))
            if use_bias
            else None
        )

    def __call__(self, x: Array) -> Array:
        kernel = self.kernel[...]
        dt = self.opts.compute_dtype(x, kernel)
        x, kernel = x.astype(dt), kernel.astype(dt)
        y = jnp.dot(x, kernel, precision=self.opts.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Conv2d(nnx.Module):
    """A 2-D convolution over the two axes before the channels; kernel ``(kh, kw, I, O)``.

    Any leading axes are batch axes (a video ``(B, F, H, W, C)`` is convolved frame by frame).
    ``padding`` is symmetric zero padding per side (PyTorch semantics).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int = 1,
        use_bias: bool = True,
        torch_rank: int = 4,
        kernel_init: Callable | None = None,
        opts: ComputeOptions = DEFAULT_OPTIONS,
        param_dtype=F32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.torch_rank = torch_rank
        self.opts = opts
        fan_in = in_features * kernel_size * kernel_size
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param((kernel_init or torch_uniform(fan_in))(draw_key(rngs), shape, param_dtype))
        self.bias = nnx.Param(torch_uniform(fan_in)(draw_key(rngs), (out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: Array, padding=None) -> Array:
        lead = x.shape[:-3]
        h, w, c = x.shape[-3:]
        x = x.reshape((-1, h, w, c))
        kernel = self.kernel[...]
        dt = self.opts.compute_dtype(x, kernel)
        p = self.padding if padding is None else padding
        pads = ((p, p), (p, p)) if isinstance(p, int) else p
        y = jax.lax.conv_general_dilated(
            x.astype(dt),
            kernel.astype(dt),
            window_strides=(self.stride, self.stride),
            padding=pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.opts.precision,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y.reshape(lead + y.shape[1:])


class TemporalConv(nnx.Module):
    """PyTorch Conv1d over the frame axis of ``(B, F, H, W, C)`` (zero padding ``k//2``); kernel ``(k, C, C)``."""

    def __init__(
        self,
        features: int,
        out_features: int | None = None,
        kernel_size: int = 3,
        *,
        dirac: bool = True,
        opts: ComputeOptions = DEFAULT_OPTIONS,
        param_dtype=F32,
        rngs: nnx.Rngs,
    ):
        out_features = out_features or features
        self.kernel_size = kernel_size
        self.torch_rank = 3
        self.opts = opts
        fan_in = features * kernel_size
        shape = (kernel_size, features, out_features)
        init = dirac_temporal_init if dirac else torch_uniform(fan_in)
        self.kernel = nnx.Param(init(draw_key(rngs), shape, param_dtype))
        binit = zeros_init if dirac else torch_uniform(fan_in)
        self.bias = nnx.Param(binit(draw_key(rngs), (out_features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        b, f, h, w, c = x.shape
        kernel = self.kernel[...]
        dt = self.opts.compute_dtype(x, kernel)
        p = self.kernel_size // 2
        y = jax.lax.conv_general_dilated(
            x.reshape(b, f, h * w, c).astype(dt),
            kernel[:, None].astype(dt),  # (k, 1, I, O): conv over F, none over the pixels
            window_strides=(1, 1),
            padding=((p, p), (0, 0)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.opts.precision,
        )
        y = y + self.bias[...].astype(y.dtype)
        return y.reshape(b, f, h, w, -1)


class Pseudo3DConv(nnx.Module):
    """(2+1)-D conv: per-frame ``k x k`` conv (``spatial_conv``) then a per-pixel 3-tap conv over frames
    (``temporal_conv``, identity at init)."""

    def __init__(self, dim: int, dim_out: int, kernel_size: int = 3, *, opts: ComputeOptions = DEFAULT_OPTIONS,
                 param_dtype=F32, rngs: nnx.Rngs):
        self.spatial_conv = Conv2d(dim, dim_out, kernel_size, padding=kernel_size // 2, torch_rank=4, opts=opts,
                                   param_dtype=param_dtype, rngs=rngs)
        self.temporal_conv = TemporalConv(dim_out, dim_out, kernel_size, dirac=True, opts=opts,
                                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.temporal_conv(self.spatial_conv(x))


# -- normalisation ------------------------------------------------------------------------------------

class GroupNorm(nnx.Module):
    """PyTorch GroupNorm on channels-last input: statistics over every axis but the first (batch) within
    each channel group, two-pass variance, float32 statistics.

    A video ``(B, F, H, W, C)`` is thus normalised *across frames* (the reference's 5-D GroupNorm); reshape
    to ``(B*F, H, W, C)`` for per-frame statistics.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, *,
                 opts: ComputeOptions = DEFAULT_OPTIONS, param_dtype=F32, rngs: nnx.Rngs | None = None):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
        self.num_groups, self.eps, self.opts = num_groups, eps, opts
        self.torch_rank = 1
        self.scale = nnx.Param(const_vector(num_channels, 1.0, param_dtype))
        self.bias = nnx.Param(const_vector(num_channels, 0.0, param_dtype))

    def __call__(self, x: Array) -> Array:
        # the project's one group norm (accurate float32 statistics over long reductions)
        y = group_norm(x.astype(F32), self.scale[...], self.bias[...], self.num_groups, self.eps)
        return y.astype(self.opts.out_dtype(x))


class LayerNorm(nnx.Module):
    """PyTorch LayerNorm over the last axis (affine), float32 statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, opts: ComputeOptions = DEFAULT_OPTIONS,
                 param_dtype=F32, rngs: nnx.Rngs | None = None):
        self.eps, self.opts = eps, opts
        self.torch_rank = 1
        self.scale = nnx.Param(const_vector(num_features, 1.0, param_dtype))
        self.bias = nnx.Param(const_vector(num_features, 0.0, param_dtype))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(F32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        xc = xf - mean
        var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(F32) + self.bias[...].astype(F32)
        return y.astype(self.opts.out_dtype(x))


class BatchNorm(nnx.Module):
    """PyTorch BatchNorm2d on ``(N, H, W, C)``.

    ``train=False``: running statistics. ``train=True``: batch statistics (biased variance) for the output,
    and the running statistics are updated in place with ``momentum`` using the *unbiased* batch variance,
    ``num_batches_tracked`` is incremented (PyTorch semantics).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, *,
                 opts: ComputeOptions = DEFAULT_OPTIONS, param_dtype=F32, rngs: nnx.Rngs | None = None):
        self.eps, self.momentum, self.opts = eps, momentum, opts
        self.torch_rank = 1
        self.scale = nnx.Param(const_vector(num_features, 1.0, param_dtype))
        self.bias = nnx.Param(const_vector(num_features, 0.0, param_dtype))
        self.mean = nnx.BatchStat(const_vector(num_features, 0.0, param_dtype))
        self.var = nnx.BatchStat(const_vector(num_features, 1.0, param_dtype))
        self.num_batches_tracked = nnx.BatchStat(jnp.asarray(np.zeros((), np.int32)))

    def __call__(self, x: Array, train: bool = False) -> Array:
        xf = x.astype(F32)
        if train:
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            m = self.momentum
            unbiased = var * (n / max(n - 1, 1))
            rm, rv = self.mean[...], self.var[...]
            self.mean[...] = ((1 - m) * rm.astype(F32) + m * mean).astype(rm.dtype)
            self.var[...] = ((1 - m) * rv.astype(F32) + m * unbiased).astype(rv.dtype)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        else:
            mean, var = self.mean[...].astype(F32), self.var[...].astype(F32)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(F32) + self.bias[...].astype(F32)
        return y.astype(self.opts.out_dtype(x))


# -- embeddings -----------------------------------------------------------------------------------------

def timestep_embedding(t: Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 1000.0) -> Array:
    """Sinusoidal embedding ``(N,) -> (N, dim)`` in float32 (reference ``get_timestep_embedding``).

    ``freq_i = exp(-ln(max_period) * i / (dim//2 - freq_shift))``; ``[sin, cos]`` or, flipped, ``[cos, sin]``;
    odd ``dim`` is zero-padded.
    """
    half = dim // 2
    exponent = jnp.float32(-math.log(max_period)) * jnp.arange(half, dtype=F32)
    exponent = exponent / jnp.float32(half - freq_shift)
    args = t.astype(F32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> SiLU -> linear_2``."""

    def __init__(self, in_features: int, out_features: int, *, opts: ComputeOptions = DEFAULT_OPTIONS,
                 param_dtype=F32, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, out_features, opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Linear(out_features, out_features, opts=opts, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(silu(self.linear_1(x)))


class Placeholder(nnx.Module):
    """A parameter-less stand-in for a PyTorch module without weights (``nn.Dropout`` in ``ff.net.1``),
    so that the indices of an ``nnx.List`` match the PyTorch ``nn.Sequential``."""

    def __call__(self, x: Array) -> Array:
        return x
