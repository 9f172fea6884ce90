"""The M3DDM / M3DDM+ 3D U-Net (``UNet3DConditionModel`` of the reference) in Flax NNX, channels-last.

Spec: ``M3DDM_SPEC.md`` §1. Attribute names mirror the PyTorch module names, so every Flax variable path maps
1:1 to a key of the released state dict (see :mod:`m3ddm_jax.interop.unet`).

Forward::

    eps = model(sample,          # (B', F, h, w, in_channels)  B' = b * guidance
                timestep,        # scalar, (b,) or (B',); truncated to int like the reference's int64 cast
                global_latents,  # (b * g, hg, wg, 4): VAE latents of the g global frames of each sample
                fps,             # scalar, (b,) or (B',); truncated to int
                guidance=1,      # the reference's do_classfier: 1 (training), 2 or 4 (two-factor CFG); 3: see below
                train=False)     # True: the global encoder's BatchNorms use/update batch statistics
    # -> (B', F, h, w, out_channels)

With ``guidance=4`` the context rows are ``[zeros, zeros, G, G]`` (each a block of ``b`` samples), with
``guidance=2`` ``[zeros, G]`` (``is_empty_img=True``: ``[G, zeros]``); the zeros are latents fed through the
encoder (spec §1.10). ``sample`` must be ordered the same way (the sampler's job). ``guidance=3`` (not in the
reference) is ``guidance=4`` without the ``uc`` row that two-factor guidance never uses: rows ``uu, cu, cc``,
contexts ``[zeros, zeros, G]``; its outputs equal rows 0, 1, 3 of ``guidance=4``.

Speed/memory design: the global tokens' keys/values are computed once per sample (not per frame) and the
cross-attention queries of all frames of a sample are grouped against them; attention never builds more
than ``attention_budget_mib`` of scores at once (query chunking); in eval mode the encoder runs once on
the global latents and once on a single zero frame instead of on the ``guidance``-times replicated batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.errors import ConfigError
from m3ddm_jax.models.attention import IMPLEMENTATIONS, attention
from m3ddm_jax.models.global_encoder import IN_CHANNELS as ENC_IN_CHANNELS
from m3ddm_jax.models.global_encoder import OUT_CHANNELS as ENC_OUT_CHANNELS
from m3ddm_jax.models.global_encoder import LightImageEncoder, encoder_output_size
from m3ddm_jax.models.layers import (
    AUTO_BUDGET_MIB,
    DEFAULT_OPTIONS,
    F32,
    ComputeOptions,
    Conv2d,
    GroupNorm,
    KeySource,
    LayerNorm,
    Linear,
    Placeholder,
    Pseudo3DConv,
    TimestepEmbedding,
    identity_init,
    silu,
    timestep_embedding,
    zeros_init,
)

Array = jax.Array

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock3D", "DownBlockP3D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock3D", "UpBlockP3D")
TIME_MAX_PERIOD = 1000
FPS_MAX_PERIOD = 30
TEMPORAL_PE_DIM = 320
TRANSFORMER_NORM_EPS = 1e-6
GUIDANCE_MODES = (1, 2, 3, 4)

# Constructor defaults of the reference (used for fields a config.json does not state, as diffusers does).
CODE_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": None,
    "attention_head_dim": 8,
}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class UNet3DConfig:
    """The U-Net's diffusers ``config.json`` fields (spec §1.1).

    The dataclass defaults are the values of the released M3DDM model (1,299,279,320 parameters).
    :meth:`from_dict` reads a ``config.json`` as written; fields it does not state take the *reference's code
    defaults* (as ``from_pretrained`` would). ``attention_head_dim`` is the NUMBER of heads.
    Unsupported values raise :class:`ConfigError` naming the field.
    """

    sample_size: Any = None
    in_channels: int = 9
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlockP3D")
    up_block_types: tuple = ("UpBlockP3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 320
    attention_head_dim: int = 8
    # Other keys of the config file (``_class_name``, ``_diffusers_version``, ...) as (key, JSON text) pairs,
    # kept for a faithful export; not part of equality.
    extra: tuple = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                object.__setattr__(self, name, tuple(v))
        self.validate()

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field: str, why: str):
            raise ConfigError(f"U-Net config field {field!r} = {getattr(self, field)!r}: {why}")

        for f in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups", "attention_head_dim"):
            v = getattr(self, f)
            if not _is_int(v) or v < 1:
                bad(f, "must be a positive integer")
        if not isinstance(self.block_out_channels, tuple) or not self.block_out_channels or not all(
            _is_int(c) and c > 0 for c in self.block_out_channels
        ):
            bad("block_out_channels", "must be a non-empty list of positive integers")
        n = len(self.block_out_channels)
        for f, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            v = getattr(self, f)
            if not isinstance(v, tuple) or len(v) != n:
                bad(f, f"must list {n} block types, one per block_out_channels entry")
            for t in v:
                if t not in allowed:
                    bad(f, f"unsupported block type {t!r} (supported: {', '.join(allowed)})")
        if self.center_input_sample is not False:
            bad("center_input_sample", "only false is supported (the released model uses false)")
        if not isinstance(self.flip_sin_to_cos, bool):
            bad("flip_sin_to_cos", "must be true or false")
        if not _is_num(self.freq_shift) or self.freq_shift >= self.block_out_channels[0] // 2:
            bad("freq_shift", "must be a number below block_out_channels[0] // 2")
        if self.act_fn not in ("silu", "swish"):
            bad("act_fn", "only 'silu' is supported")
        if not _is_num(self.norm_eps) or not self.norm_eps > 0:
            bad("norm_eps", "must be a positive number")
        if not _is_num(self.mid_block_scale_factor) or not self.mid_block_scale_factor > 0:
            bad("mid_block_scale_factor", "must be a positive number")
        if not _is_int(self.downsample_padding) or self.downsample_padding not in (0, 1):
            bad("downsample_padding", "must be 0 or 1")
        if self.cross_attention_dim != ENC_OUT_CHANNELS:
            bad("cross_attention_dim", f"must be {ENC_OUT_CHANNELS} (the global encoder's output width)")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                bad("norm_num_groups", f"does not divide block width {c}")
        attn_widths = {c for c, t in zip(self.block_out_channels, self.down_block_types) if t.startswith("CrossAttn")}
        attn_widths |= {c for c, t in zip(reversed(self.block_out_channels), self.up_block_types)
                        if t.startswith("CrossAttn")}
        attn_widths.add(self.block_out_channels[-1])  # mid block
        for c in sorted(attn_widths):
            if c % self.attention_head_dim:
                bad("attention_head_dim", f"(the number of heads) does not divide transformer width {c}")
        if self.layers_per_block == 1:
            # The reference builds each Downsample3D with the block's *input* width when there is one layer.
            for i in range(1, n - 1):
                if self.block_out_channels[i - 1] != self.block_out_channels[i]:
                    bad("layers_per_block", "1 needs equal block_out_channels for every non-final down block "
                        "(the reference's downsampler takes the block input width)")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    # -- I/O ---------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNet3DConfig":
        if not isinstance(d, Mapping):
            raise ConfigError("U-Net config must be a JSON object")
        names = cls.field_names()
        kw = {k: d.get(k, CODE_DEFAULTS[k]) for k in names}
        extra = tuple((k, json.dumps(v, sort_keys=True)) for k, v in d.items() if k not in names)
        unknown = [k for k, _ in extra if not k.startswith("_")]
        if unknown:
            warnings.warn(f"U-Net config: ignoring unknown field(s) {', '.join(sorted(unknown))}", stacklevel=2)
        for k in ("down_block_types", "up_block_types", "block_out_channels"):
            if not isinstance(kw[k], (list, tuple)):
                raise ConfigError(f"U-Net config field {k!r} = {kw[k]!r}: must be a list")
        return cls(**kw, extra=extra)

    @classmethod
    def from_json_file(cls, path) -> "UNet3DConfig":
        from pathlib import Path  # noqa: PLC0415

        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read U-Net config {path}: {e}") from e
        return cls.from_dict(d)

    def to_dict(self, *, diffusers: bool = True) -> dict[str, Any]:
        """The config as a diffusers ``config.json`` dict (``_class_name`` = ``UNet3DConditionModel``)."""
        out: dict[str, Any] = {}
        for k, v in self.extra:
            if k != "_m3ddm_jax":
                out[k] = json.loads(v)
        for k in self.field_names():
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        if diffusers:
            out["_class_name"] = "UNet3DConditionModel"
            out.setdefault("_diffusers_version", "0.34.0")
        return dict(sorted(out.items()))


def as_config(config) -> UNet3DConfig:
    if isinstance(config, UNet3DConfig):
        return config
    return UNet3DConfig.from_dict(config)


# -- attention and transformer --------------------------------------------------------------------------

def query_chunk_for(opts: ComputeOptions, batch: int, heads: int, lq: int, lk: int, head_dim: int) -> int | None:
    """Largest power-of-two query chunk whose float32 scores ``(batch, heads, chunk, lk)`` fit the budget
    (``None``: no chunking needed or wanted)."""
    budget = opts.attention_budget_mib
    if opts.attention_impl != "xla" or budget is None:
        return None
    if budget == "auto":
        budget = AUTO_BUDGET_MIB * min(max(head_dim / 32, 1 / 8), 4)
    per_row = batch * heads * lk * 4
    rows = int(float(budget) * 2**20) // max(per_row, 1)
    if rows >= lq:
        return None
    return max(1 << (max(rows, 1).bit_length() - 1), 8)


def _run(opts: ComputeOptions, module: nnx.Module, *args):
    """Call ``module(*args)``, rematerialised in the backward pass when ``opts.remat``."""
    if opts.remat:
        return nnx.remat(lambda m, *a: m(*a))(module, *args)
    return module(*args)


class CrossAttention(nnx.Module):
    """``to_q/to_k/to_v`` (no bias), ``heads`` heads, ``to_out.0`` (bias; zero-initialised weight).

    ``context=None`` is self-attention. If ``context`` has fewer rows than ``x`` (``x`` rows are
    ``(B F)``-ordered frames of ``B`` context rows), the queries of all frames of a sample are grouped
    into one row against that sample's keys/values: the same math as repeating the context per frame,
    without computing the context projections ``F`` times.
    """

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None, *,
                 opts: ComputeOptions = DEFAULT_OPTIONS, param_dtype=F32, rngs: nnx.Rngs):
        ctx = context_dim or query_dim
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.opts = heads, opts
        self.to_q = Linear(query_dim, query_dim, use_bias=False, **kw)
        self.to_k = Linear(ctx, query_dim, use_bias=False, **kw)
        self.to_v = Linear(ctx, query_dim, use_bias=False, **kw)
        self.to_out = nnx.List([Linear(query_dim, query_dim, kernel_init=zeros_init, **kw)])

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        src = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(src), self.to_v(src)
        bq, lq, c = q.shape
        bk, lk = k.shape[0], k.shape[1]
        if bq != bk:
            if bq % bk:
                raise ValueError(f"attention: {bq} query rows do not group into {bk} context rows")
            q = q.reshape(bk, (bq // bk) * lq, c)
        chunk = query_chunk_for(self.opts, q.shape[0], self.heads, q.shape[1], lk, c // self.heads)
        out = attention(q, k, v, self.heads, impl=self.opts.attention_impl, query_chunk=chunk)
        return self.to_out[0](out.reshape(bq, lq, c))


class GEGLU(nnx.Module):
    def __init__(self, dim_in: int, dim_out: int, *, opts: ComputeOptions, param_dtype, rngs: nnx.Rngs):
        self.proj = Linear(dim_in, 2 * dim_out, opts=opts, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``net.0`` = GEGLU(dim -> 4 dim), ``net.1`` = (dropout, no weights), ``net.2`` = Linear(4 dim -> dim)."""

    def __init__(self, dim: int, mult: int = 4, *, opts: ComputeOptions, param_dtype, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([
            GEGLU(dim, inner, opts=opts, param_dtype=param_dtype, rngs=rngs),
            Placeholder(),
            Linear(inner, dim, opts=opts, param_dtype=param_dtype, rngs=rngs),
        ])

    def __call__(self, x: Array) -> Array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LN: self-attention, cross-attention (self-attention if no context), GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, *, opts: ComputeOptions, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.attn1 = CrossAttention(dim, heads, None, **kw)
        self.ff = FeedForward(dim, **kw)
        self.attn2 = CrossAttention(dim, heads, context_dim, **kw)
        self.norm1 = LayerNorm(dim, 1e-5, opts=opts, param_dtype=param_dtype)
        self.norm2 = LayerNorm(dim, 1e-5, opts=opts, param_dtype=param_dtype)
        self.norm3 = LayerNorm(dim, 1e-5, opts=opts, param_dtype=param_dtype)

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTemporalTransformer(nnx.Module):
    """Spatial transformer per frame (cross-attending to the global tokens) then temporal transformer per
    pixel (with a learned absolute frame-position embedding); both with residuals (spec §1.6)."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: int, *,
                 opts: ComputeOptions = DEFAULT_OPTIONS, param_dtype=F32, rngs: nnx.Rngs):
        c = channels
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.opts = opts
        self.norm = GroupNorm(groups, c, TRANSFORMER_NORM_EPS, opts=opts, param_dtype=param_dtype)
        self.proj_in = Linear(c, c, torch_rank=4, **kw)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(c, heads, context_dim, **kw)])
        self.proj_out = Linear(c, c, torch_rank=4, **kw)
        self.temporal_position_embed_proj = TimestepEmbedding(TEMPORAL_PE_DIM, c, **kw)
        self.norm2 = GroupNorm(groups, c, TRANSFORMER_NORM_EPS, opts=opts, param_dtype=param_dtype)
        self.proj_in2 = Linear(c, c, torch_rank=5, kernel_init=identity_init, bias_init=zeros_init, **kw)
        self.transformer_blocks2 = nnx.List([BasicTransformerBlock(c, heads, None, **kw)])
        self.proj_out2 = Linear(c, c, torch_rank=5, kernel_init=identity_init, bias_init=zeros_init, **kw)

    def position_embedding(self, frames: int) -> Array:
        pos = timestep_embedding(jnp.arange(frames, dtype=F32), TEMPORAL_PE_DIM, flip_sin_to_cos=True,
                                 freq_shift=0, max_period=TIME_MAX_PERIOD)
        dt = self.opts.dtype if self.opts.dtype is not None else self.proj_in2.kernel.dtype
        return self.temporal_position_embed_proj(pos.astype(dt))

    def __call__(self, x: Array, context: Array | None, capture: dict | None = None, name: str = "") -> Array:
        b, f, h, w, c = x.shape
        # spatial, per frame
        y = self.norm(x.reshape(b * f, h, w, c))
        y = self.proj_in(y).reshape(b * f, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        x = self.proj_out(y).reshape(b, f, h, w, c) + x
        # temporal, per pixel
        y = self.proj_in2(self.norm2(x))
        pe = self.position_embedding(f)
        if capture is not None:
            capture[f"{name}.temporal_position_embed_proj"] = pe
        y = y.transpose(0, 2, 3, 1, 4).reshape(b * h * w, f, c) + pe[None].astype(y.dtype)
        for block in self.transformer_blocks2:
            y = block(y, None)
        y = y.reshape(b, h, w, f, c).transpose(0, 3, 1, 2, 4)
        return self.proj_out2(y) + x


# -- ResNet and samplers -------------------------------------------------------------------------------

class ResnetBlockP3D(nnx.Module):
    """GN (across frames) -> SiLU -> Pseudo3DConv -> + time proj + fps proj -> GN -> SiLU -> Pseudo3DConv,
    plus the (1x1x1 conv) shortcut, divided by ``output_scale_factor``."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float, output_scale_factor: float = 1.0, *,
                 opts: ComputeOptions = DEFAULT_OPTIONS, param_dtype=F32, rngs: nnx.Rngs):
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, cin, eps, opts=opts, param_dtype=param_dtype)
        self.conv1 = Pseudo3DConv(cin, cout, 3, **kw)
        self.time_emb_proj = Linear(temb, cout, **kw)
        self.fps_emb_proj = Linear(temb, cout, **kw)
        self.norm2 = GroupNorm(groups, cout, eps, opts=opts, param_dtype=param_dtype)
        self.conv2 = Pseudo3DConv(cout, cout, 3, **kw)
        self.conv_shortcut = Linear(cin, cout, torch_rank=5, **kw) if cin != cout else None

    def __call__(self, x: Array, emb: Array, femb: Array) -> Array:
        h = self.conv1(silu(self.norm1(x)))
        h = h + self.time_emb_proj(silu(emb))[:, None, None, None, :]
        h = h + self.fps_emb_proj(silu(femb))[:, None, None, None, :]
        h = self.conv2(silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        if self.output_scale_factor != 1:
            out = out / self.output_scale_factor
        return out


class Downsample3D(nnx.Module):
    """Per-frame 3x3 conv with stride 2 (``conv``; a (1,3,3) Conv3d in PyTorch)."""

    def __init__(self, channels: int, padding: int = 1, *, opts: ComputeOptions = DEFAULT_OPTIONS, param_dtype=F32,
                 rngs: nnx.Rngs):
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, torch_rank=5, opts=opts,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        if self.padding == 0:  # reference: pad right/bottom by one, then a valid strided conv
            return self.conv(x, padding=((0, 1), (0, 1)))
        return self.conv(x)


class Upsample3D(nnx.Module):
    """Per-frame nearest-neighbour x2 then a 3x3 conv (``conv``; a (1,3,3) Conv3d in PyTorch)."""

    def __init__(self, channels: int, *, opts: ComputeOptions = DEFAULT_OPTIONS, param_dtype=F32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, torch_rank=5, opts=opts, param_dtype=param_dtype,
                           rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, f, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, f, h, 2, w, 2, c)).reshape(b, f, 2 * h, 2 * w, c)
        return self.conv(x)


# -- blocks ---------------------------------------------------------------------------------------------

class DownBlock(nnx.Module):
    """``CrossAttnDownBlock3D`` (ResNet -> transformer per layer) or ``DownBlockP3D`` (ResNets only),
    then an optional ``Downsample3D``. Returns ``(hidden, outputs appended to the skip list)``."""

    def __init__(self, block_type: str, cin: int, cout: int, num_layers: int, temb: int, groups: int, eps: float,
                 heads: int, context_dim: int, add_downsample: bool, padding: int, *, opts: ComputeOptions,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.opts = opts
        self.resnets = nnx.List([
            ResnetBlockP3D(cin if i == 0 else cout, cout, temb, groups, eps, **kw) for i in range(num_layers)
        ])
        self.attentions = (
            nnx.List([SpatialTemporalTransformer(cout, heads, groups, context_dim, **kw) for _ in range(num_layers)])
            if block_type == "CrossAttnDownBlock3D"
            else None
        )
        self.downsamplers = nnx.List([Downsample3D(cout, padding, **kw)]) if add_downsample else None

    def __call__(self, x, emb, femb, context, capture=None, name=""):
        outs = []
        for i, resnet in enumerate(self.resnets):
            x = _run(self.opts, resnet, x, emb, femb) if capture is None else resnet(x, emb, femb)
            if capture is not None:
                capture[f"{name}.resnets.{i}"] = x
            if self.attentions is not None:
                attn = self.attentions[i]
                if capture is None:
                    x = _run(self.opts, attn, x, context)
                else:
                    x = attn(x, context, capture, f"{name}.attentions.{i}")
                    capture[f"{name}.attentions.{i}"] = x
            outs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outs.append(x)
        return x, outs


class MidBlock(nnx.Module):
    """``UNetMidBlock3DCrossAttn``: ResNet -> transformer -> ResNet."""

    def __init__(self, channels: int, temb: int, groups: int, eps: float, heads: int, context_dim: int,
                 output_scale_factor: float, *, opts: ComputeOptions, param_dtype, rngs: nnx.Rngs):
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.opts = opts
        self.resnets = nnx.List([
            ResnetBlockP3D(channels, channels, temb, groups, eps, output_scale_factor, **kw) for _ in range(2)
        ])
        self.attentions = nnx.List([SpatialTemporalTransformer(channels, heads, groups, context_dim, **kw)])

    def __call__(self, x, emb, femb, context, capture=None, name=""):
        x = _run(self.opts, self.resnets[0], x, emb, femb)
        x = _run(self.opts, self.attentions[0], x, context) if capture is None else self.attentions[0](
            x, context, capture, f"{name}.attentions.0")
        return _run(self.opts, self.resnets[1], x, emb, femb)


class UpBlock(nnx.Module):
    """``CrossAttnUpBlock3D`` / ``UpBlockP3D``: per layer ``concat([hidden, skip])`` -> ResNet [-> transformer],
    then an optional ``Upsample3D``."""

    def __init__(self, block_type: str, cin: int, cout: int, prev_out: int, num_layers: int, temb: int, groups: int,
                 eps: float, heads: int, context_dim: int, add_upsample: bool, *, opts: ComputeOptions, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.opts = opts
        resnets = []
        for i in range(num_layers):
            skip_c = cin if i == num_layers - 1 else cout
            res_in = prev_out if i == 0 else cout
            resnets.append(ResnetBlockP3D(res_in + skip_c, cout, temb, groups, eps, **kw))
        self.resnets = nnx.List(resnets)
        self.attentions = (
            nnx.List([SpatialTemporalTransformer(cout, heads, groups, context_dim, **kw) for _ in range(num_layers)])
            if block_type == "CrossAttnUpBlock3D"
            else None
        )
        self.upsamplers = nnx.List([Upsample3D(cout, **kw)]) if add_upsample else None

    def __call__(self, x, skips, emb, femb, context, capture=None, name=""):
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = _run(self.opts, resnet, x, emb, femb)
            if self.attentions is not None:
                attn = self.attentions[i]
                x = _run(self.opts, attn, x, context) if capture is None else attn(
                    x, context, capture, f"{name}.attentions.{i}")
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


# -- the model ------------------------------------------------------------------------------------------

class UNet3DConditionModel(nnx.Module):
    """The M3DDM 3D U-Net with its global-frame encoder (see the module docstring for the call).

    Args:
        config: :class:`UNet3DConfig` or a config.json dict.
        dtype: compute dtype (``None``: the parameters' dtype; ``jnp.bfloat16`` for bf16 compute with fp32 params).
        param_dtype: dtype of randomly initialised parameters.
        attention_impl: ``"xla"`` (default), ``"dot_product"`` or ``"cudnn"``.
        attention_budget_mib: per-chunk float32 score budget of the ``"xla"`` attention in MiB, ``"auto"``
            (head-width dependent, see :class:`~m3ddm_jax.models.layers.ComputeOptions`) or ``None`` (no chunking).
        remat: rematerialise each ResNet / transformer in the backward pass (training memory).
        precision: ``jax.lax.Precision`` of matmuls and convolutions.
    """

    def __init__(
        self,
        config: UNet3DConfig | Mapping,
        *,
        dtype=None,
        param_dtype=F32,
        attention_impl: str = "xla",
        attention_budget_mib: float | str | None = "auto",
        remat: bool = False,
        precision=None,
        rngs: nnx.Rngs,
    ):
        cfg = as_config(config)
        if not (attention_budget_mib is None or attention_budget_mib == "auto" or (
                _is_num(attention_budget_mib) and attention_budget_mib > 0)):
            raise ConfigError(f"attention_budget_mib {attention_budget_mib!r}: a positive number, 'auto' or None")
        if attention_impl not in IMPLEMENTATIONS:
            raise ConfigError(f"attention_impl {attention_impl!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
        if dtype is not None:
            dtype = jnp.dtype(dtype)
        opts = ComputeOptions(dtype=dtype, precision=precision, attention_impl=attention_impl,
                              attention_budget_mib=attention_budget_mib, remat=bool(remat))
        self.config = cfg
        self.opts = opts
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=KeySource(rngs))
        ch = cfg.block_out_channels
        c0, temb, n = ch[0], cfg.time_embed_dim, len(ch)
        groups, eps = cfg.norm_num_groups, float(cfg.norm_eps)
        heads, ctx = cfg.attention_head_dim, cfg.cross_attention_dim

        self.conv_in = Conv2d(cfg.in_channels, c0, 3, padding=1, torch_rank=5, **kw)
        self.time_embedding = TimestepEmbedding(c0, temb, **kw)
        self.fps_embedding = TimestepEmbedding(c0, temb, **kw)

        down, cout = [], c0
        for i, btype in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            down.append(DownBlock(btype, cin, cout, cfg.layers_per_block, temb, groups, eps, heads, ctx,
                                  add_downsample=i < n - 1, padding=cfg.downsample_padding, **kw))
        self.down_blocks = nnx.List(down)
        self.mid_block = MidBlock(ch[-1], temb, groups, eps, heads, ctx, float(cfg.mid_block_scale_factor), **kw)
        rev = list(reversed(ch))
        up, cout = [], rev[0]
        for i, btype in enumerate(cfg.up_block_types):
            prev, cout = cout, rev[i]
            cin = rev[min(i + 1, n - 1)]
            up.append(UpBlock(btype, cin, cout, prev, cfg.layers_per_block + 1, temb, groups, eps, heads, ctx,
                              add_upsample=i < n - 1, **kw))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(groups, c0, eps, opts=opts, param_dtype=param_dtype)
        self.conv_out = Pseudo3DConv(c0, cfg.out_channels, 3, **kw)
        self.global_img_encoder = LightImageEncoder(**kw)

    # -- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _batched_ints(value, name: str, bp: int, b: int, guidance: int) -> Array:
        """Truncate to integers (the reference's int64 cast) and broadcast to the ``B'`` rows."""
        arr = jnp.asarray(value)
        if jnp.issubdtype(arr.dtype, jnp.floating):
            arr = jnp.trunc(arr)
        arr = arr.astype(jnp.int32)
        if arr.ndim == 0 or arr.shape == (1,):
            return jnp.broadcast_to(arr.reshape(()), (bp,))
        if arr.ndim == 1 and arr.shape[0] == bp:
            return arr
        if arr.ndim == 1 and arr.shape[0] == b:
            return jnp.tile(arr, guidance)  # the guidance rows are `guidance` blocks of the b samples
        raise ValueError(f"{name} must be a scalar or have shape ({b},) or ({bp},), got {tuple(arr.shape)}")

    def global_context(self, global_latents: Array, b: int, guidance: int, *, train: bool = False,
                       is_empty_img: bool = False, capture: dict | None = None) -> Array:
        """Encoder tokens of the guidance batch, ``(b * guidance, g * h' * w', 320)`` (spec §1.10)."""
        gl = global_latents
        if self.opts.dtype is not None:
            gl = gl.astype(self.opts.dtype)
        zeros_first = not (guidance == 2 and is_empty_img)
        if train or guidance == 1:
            z = jnp.zeros_like(gl)
            rows = {1: [gl], 2: [z, gl] if zeros_first else [gl, z], 3: [z, z, gl], 4: [z, z, gl, gl]}[guidance]
            enc = self.global_img_encoder(jnp.concatenate(rows, 0) if len(rows) > 1 else gl, train)
        else:
            # Eval mode: BatchNorm is per element, so encoder(0) is the same for every zero row and the
            # duplicated rows need computing once.
            e_g = self.global_img_encoder(gl, False)
            e_z = jnp.broadcast_to(self.global_img_encoder(jnp.zeros_like(gl[:1]), False), e_g.shape)
            rows = {2: [e_z, e_g] if zeros_first else [e_g, e_z], 3: [e_z, e_z, e_g],
                    4: [e_z, e_z, e_g, e_g]}[guidance]
            enc = jnp.concatenate(rows, 0)
        if capture is not None:
            capture["global_img_encoder"] = enc
        n, hh, ww, c = enc.shape
        return enc.reshape(b * guidance, (n // (b * guidance)) * hh * ww, c)

    def window_context(self, global_latents: Array, global_rows: tuple[bool, ...]) -> Array:
        """Encoder tokens for a batch of independent samples (eval mode), sample-major: ``global_latents
        (W, g, hg, wg, 4)`` (each sample's own global frames) and, per guidance row, whether it sees them
        (``True``) or the zero frames -> ``(W * R, g * h' * w', 320)`` with row ``w * R + r``.

        Same numbers as :meth:`global_context` in eval mode (the encoder is per element); computed once per
        sampler call and passed as ``context=``, so no denoising step recomputes it."""
        nw, g = global_latents.shape[:2]
        gl = global_latents.reshape(nw * g, *global_latents.shape[2:])
        if self.opts.dtype is not None:
            gl = gl.astype(self.opts.dtype)
        e_g = self.global_img_encoder(gl, False)
        _, hh, ww, c = e_g.shape
        e_g = e_g.reshape(nw, 1, g * hh * ww, c)
        e_z = self.global_img_encoder(jnp.zeros_like(gl[:1]), False)
        e_z = jnp.broadcast_to(e_z[:, None], (1, 1, g, hh, ww, c)).reshape(1, 1, g * hh * ww, c)
        sel = jnp.asarray(global_rows, bool)[None, :, None, None]
        ctx = jnp.where(sel, e_g, e_z)  # (W, R, T, c)
        return ctx.reshape(nw * len(global_rows), g * hh * ww, c)

    # -- forward -----------------------------------------------------------------------------------
    def __call__(
        self,
        sample: Array,
        timestep,
        global_latents: Array,
        fps=1,
        *,
        guidance: int = 1,
        train: bool = False,
        is_empty_img: bool = False,
        capture: dict | None = None,
        context: Array | None = None,
    ) -> Array:
        """Predicted noise ``(B', F, h, w, out_channels)``; see the module docstring.

        ``capture``: optional dict filled with intermediate activations (channels-last), keyed like the
        reference modules (``time_proj``, ``conv_in``, ``down_blocks.0.resnets.0``, ``mid_block``, ...).
        """
        cfg = self.config
        if guidance not in GUIDANCE_MODES:
            raise ConfigError(f"guidance (do_classfier) must be one of {GUIDANCE_MODES}, got {guidance!r}")
        if sample.ndim != 5 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be (B', F, h, w, {cfg.in_channels}), got {tuple(sample.shape)}")
        bp, f, h, w, _ = sample.shape
        if bp % guidance:
            raise ValueError(f"sample batch {bp} is not a multiple of guidance {guidance}")
        b = bp // guidance
        k = cfg.downscale_factor
        if h % k or w % k:
            raise ConfigError(
                f"sample: latent size {h}x{w} must be divisible by {k} = 2**(len(block_out_channels)-1) "
                "(the reference crashes otherwise)")
        if context is not None:
            # precomputed encoder tokens, one row per sample row (e.g. :meth:`window_context`); the row order
            # is then the caller's, and ``fps``/``timestep`` must be scalars or per row ``(B',)``
            if context.ndim != 3 or context.shape[0] != bp:
                raise ValueError(f"context must be ({bp}, tokens, channels), got {tuple(context.shape)}")
        else:
            if global_latents.ndim != 4 or global_latents.shape[-1] != ENC_IN_CHANNELS or global_latents.shape[0] % b:
                raise ValueError(f"global_latents must be (b*g, hg, wg, 4) with b={b}, got {tuple(global_latents.shape)}")
            if min(encoder_output_size(global_latents.shape[1]), encoder_output_size(global_latents.shape[2])) < 1:
                raise ValueError(f"global latents {global_latents.shape[1]}x{global_latents.shape[2]} are too small "
                                 "for the global encoder (need at least 5x5)")
            context = self.global_context(global_latents, b, guidance, train=train, is_empty_img=is_empty_img,
                                          capture=capture)

        c0 = cfg.block_out_channels[0]
        wdt = self.opts.dtype if self.opts.dtype is not None else self.conv_in.kernel.dtype
        t = self._batched_ints(timestep, "timestep", bp, b, guidance)
        fp = self._batched_ints(fps, "fps", bp, b, guidance)
        t_proj = timestep_embedding(t, c0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
                                    max_period=TIME_MAX_PERIOD)
        f_proj = timestep_embedding(fp, c0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
                                    max_period=FPS_MAX_PERIOD)
        emb = self.time_embedding(t_proj.astype(wdt))
        femb = self.fps_embedding(f_proj.astype(wdt))

        x = self.conv_in(sample.astype(wdt))
        if capture is not None:
            capture.update(time_proj=t_proj, time_embedding=emb, fps_proj=f_proj, fps_embedding=femb, conv_in=x)

        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, outs = block(x, emb, femb, context, capture, f"down_blocks.{i}")
            skips.extend(outs)
            if capture is not None:
                capture[f"down_blocks.{i}"] = x
        x = self.mid_block(x, emb, femb, context, capture, "mid_block")
        if capture is not None:
            capture["mid_block"] = x
        for i, block in enumerate(self.up_blocks):
            m = len(block.resnets)
            skips, res = skips[:-m], skips[-m:]
            x = block(x, res, emb, femb, context, capture, f"up_blocks.{i}")
            if capture is not None:
                capture[f"up_blocks.{i}"] = x
        x = self.conv_norm_out(x)
        if capture is not None:
            capture["conv_norm_out"] = x
        return self.conv_out(silu(x))


def unet_from_config(config, rngs: nnx.Rngs | int = 0, **model_options) -> UNet3DConditionModel:
    """A randomly initialised U-Net (PyTorch default inits; identity temporal convs and ``proj_in2``/
    ``proj_out2``, zero ``to_out.0`` weights, as the reference)."""
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    return UNet3DConditionModel(as_config(config), rngs=rngs, **model_options)


def param_count(model_or_state) -> int:
    """Number of parameter elements (``nnx.Param`` only; BatchNorm statistics excluded)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state)))
