"""LightImageEncoder: the global-frame encoder of M3DDM (spec §1.9), channels-last.

Input: VAE latents of the global frames ``(N, hg, wg, 4)``; output ``(N, ceil(hg/2) - 2, ceil(wg/2) - 2, 320)``.
Five bottleneck ResNet stages (HuggingFace ``ResNetStage`` layout, depth 2, ReLU, BatchNorm eps 1e-5,
conv without bias, stride on the 3x3 conv), then a valid 3x3 conv 128 -> 320 with bias.

Names mirror the PyTorch module tree: ``resnet_layer.{s}.layers.{l}.layer.{0,1,2}.(convolution|normalization)``,
``resnet_layer.{s}.layers.0.shortcut.(convolution|normalization)``, ``convolution``.
"""
from __future__ import annotations

import jax
from flax import nnx

from m3ddm_jax.models.layers import DEFAULT_OPTIONS, F32, BatchNorm, ComputeOptions, Conv2d, Linear

# (in, out, stride) of the five stages (ResNetConfig(num_channels=4) defaults, hard-coded in the reference).
STAGES = ((4, 8, 1), (8, 16, 1), (16, 32, 2), (32, 64, 1), (64, 128, 1))
STAGE_DEPTH = 2
REDUCTION = 4
OUT_CHANNELS = 320
IN_CHANNELS = 4


def encoder_output_size(h: int) -> int:
    """Spatial size of the encoder output for an input of size ``h`` (stride-2 stage, then a valid 3x3 conv)."""
    return -(-h // 2) - 2


class ConvBN(nnx.Module):
    """Conv (no bias) -> BatchNorm -> optional ReLU (HF ``ResNetConvLayer`` / ``ResNetShortCut``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, relu: bool, *,
                 opts: ComputeOptions, param_dtype, rngs: nnx.Rngs):
        self.kernel_size, self.stride, self.relu = kernel_size, stride, relu
        if kernel_size == 1:
            self.convolution = Linear(cin, cout, use_bias=False, torch_rank=4, opts=opts, param_dtype=param_dtype,
                                      rngs=rngs)
        else:
            self.convolution = Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2,
                                      use_bias=False, torch_rank=4, opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.normalization = BatchNorm(cout, eps=1e-5, momentum=0.1, opts=opts, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.kernel_size == 1:
            if self.stride > 1:  # 1x1 conv with stride s, no padding == subsample then project
                x = x[:, :: self.stride, :: self.stride, :]
            y = self.convolution(x)
        else:
            y = self.convolution(x)
        y = self.normalization(y, train)
        return jax.nn.relu(y) if self.relu else y


class Bottleneck(nnx.Module):
    """HF ``ResNetBottleNeckLayer`` (``downsample_in_bottleneck=False``): 1x1 -> 3x3 (stride) -> 1x1,
    plus shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, *, opts: ComputeOptions, param_dtype, rngs: nnx.Rngs):
        mid = cout // REDUCTION
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.shortcut = ConvBN(cin, cout, 1, stride, False, **kw) if (cin != cout or stride != 1) else None
        self.layer = nnx.List([
            ConvBN(cin, mid, 1, 1, True, **kw),
            ConvBN(mid, mid, 3, stride, True, **kw),
            ConvBN(mid, cout, 1, 1, False, **kw),
        ])

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        residual = self.shortcut(x, train) if self.shortcut is not None else x
        h = x
        for conv in self.layer:
            h = conv(h, train)
        return jax.nn.relu(h + residual)


class Stage(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, opts: ComputeOptions, param_dtype, rngs: nnx.Rngs):
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [Bottleneck(cin, cout, stride, **kw)] + [Bottleneck(cout, cout, 1, **kw) for _ in range(STAGE_DEPTH - 1)]
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for layer in self.layers:
            x = layer(x, train)
        return x


class LightImageEncoder(nnx.Module):
    """Global-frame latents ``(N, hg, wg, 4)`` -> tokens grid ``(N, hg', wg', 320)``.

    ``train=True`` uses batch statistics in every BatchNorm and updates the running statistics in place
    (the reference trainer keeps the U-Net in train mode).
    """

    def __init__(self, *, opts: ComputeOptions = DEFAULT_OPTIONS, param_dtype=F32, rngs: nnx.Rngs):
        kw = dict(opts=opts, param_dtype=param_dtype, rngs=rngs)
        self.resnet_layer = nnx.List([Stage(cin, cout, s, **kw) for cin, cout, s in STAGES])
        self.convolution = Conv2d(STAGES[-1][1], OUT_CHANNELS, 3, padding=0, use_bias=True, torch_rank=4, **kw)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for stage in self.resnet_layer:
            x = stage(x, train)
        return self.convolution(x)
