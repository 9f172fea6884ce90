"""LPIPS (Zhang et al. 2018, "v0.1" linear heads) in Flax NNX, channels-last.

``LPIPS(net="alex")`` is the paper's metric (``lpips.LPIPS(net='alex')``); ``net="vgg"`` (VGG-16) is the
option. The computation, for images ``x, y`` in ``[-1, 1]``:

1. scaling layer: ``(x - shift) / scale`` with shift ``(-.030, -.088, -.188)``, scale ``(.458, .448, .450)``;
2. the ImageNet trunk (torchvision AlexNet ``features`` / VGG-16 ``features``), tapping the ReLU outputs
   (AlexNet: after conv1..conv5; VGG: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3);
3. per tap: unit-normalise over channels (``f / (||f||_2 + 1e-10)``), squared difference, the linear head
   (a bias-free 1x1 convolution to one channel with non-negative learned weights), spatial mean;
4. sum over the five taps.

With a ``weights`` map (``H x W``, 1 on the pixels to score) the spatial mean of step 3 becomes a mean
weighted by the map resized to each tap's resolution (antialiased linear), i.e. LPIPS of a region.

Weights (see :mod:`m3ddm_jax.metrics.weights` for the spec forms):

* trunk: torchvision's ImageNet state dict (``features.{i}.weight/bias``), default
  ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth`` from torchvision's download folder or URL;
* heads: the ``lpips`` package's ``weights/v0.1/{alex,vgg}.pth`` (``lin{k}.model.1.weight``), found inside an
  installed ``lpips`` package (``pip install lpips --no-deps`` is enough: only its data files are read).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.errors import CheckpointError, ConfigError
from m3ddm_jax.metrics.weights import package_file, read_arrays, resolve_file, torch_hub_checkpoints

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class TrunkSpec:
    convs: tuple[tuple[int, int, int, int, int], ...]  # (in, out, kernel, stride, pad)
    torch_index: tuple[int, ...]                       # index of each conv in torchvision's ``features``
    pool_before: tuple[bool, ...]                      # a max pool runs before this conv
    pool: tuple[int, int]                              # (window, stride)
    taps: tuple[int, ...]                              # conv indices whose ReLU output is a tap
    url: str

    @property
    def tap_channels(self) -> tuple[int, ...]:
        return tuple(self.convs[i][1] for i in self.taps)


ALEX = TrunkSpec(
    convs=((3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)),
    torch_index=(0, 3, 6, 8, 10),
    pool_before=(False, True, True, False, False),
    pool=(3, 2),
    taps=(0, 1, 2, 3, 4),
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
)
_VGG_CH = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16 = TrunkSpec(
    convs=tuple((3 if i == 0 else _VGG_CH[i - 1], c, 3, 1, 1) for i, c in enumerate(_VGG_CH)),
    torch_index=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    pool_before=(False, False, True, False, True, False, False, True, False, False, True, False, False),
    pool=(2, 2),
    taps=(1, 3, 6, 9, 12),
    url="https://download.pytorch.org/models/vgg16-397923af.pth",
)
TRUNKS = {"alex": ALEX, "vgg": VGG16}
HEADS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/{net}.pth"


def _max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """torch ``MaxPool2d(window, stride)`` (no padding, floor mode) on ``(N, H, W, C)``."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


class LPIPS(nnx.Module):
    def __init__(self, net: str = "alex", *, rngs: nnx.Rngs):
        if net not in TRUNKS:
            raise ConfigError(f"LPIPS net must be one of {tuple(TRUNKS)}, got {net!r}")
        self.net = net
        spec = TRUNKS[net]
        self.convs = nnx.List([
            nnx.Conv(cin, cout, (k, k), (s, s), padding=((p, p), (p, p)), precision=_HI, rngs=rngs)
            for cin, cout, k, s, p in spec.convs
        ])
        self.heads = nnx.List([nnx.Param(jnp.full((c,), 1.0 / c, jnp.float32)) for c in spec.tap_channels])

    @property
    def spec(self) -> TrunkSpec:
        return TRUNKS[self.net]

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The five tapped ReLU outputs for images in [-1, 1] (after the scaling layer)."""
        spec = self.spec
        h = (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)
        taps = []
        for i, conv in enumerate(self.convs):
            if spec.pool_before[i]:
                h = _max_pool(h, *spec.pool)
            h = jax.nn.relu(conv(h))
            if i in spec.taps:
                taps.append(h)
        return taps

    def __call__(self, x: jax.Array, y: jax.Array, weights: jax.Array | None = None) -> jax.Array:
        """LPIPS distance per image, ``x, y (N, H, W, 3)`` in [-1, 1] -> ``(N,)``."""
        fx, fy = self.features(x), self.features(y)
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for a, b, head in zip(fx, fy, self.heads):
            na = a / (jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True)) + EPS)
            nb = b / (jnp.sqrt(jnp.sum(b * b, axis=-1, keepdims=True)) + EPS)
            d = jnp.einsum("nhwc,c->nhw", jnp.square(na - nb), head[...], precision=_HI)
            if weights is None:
                total = total + jnp.mean(d, axis=(1, 2))
            else:
                w = jax.image.resize(jnp.asarray(weights, jnp.float32), d.shape[1:], "linear", antialias=True)
                total = total + jnp.sum(d * w, axis=(1, 2)) / jnp.maximum(jnp.sum(w), 1e-12)
        return total


# -- weights -----------------------------------------------------------------------------------------------

def _trunk_hint(net: str) -> str:
    name = TRUNKS[net].url.rsplit("/", 1)[-1]
    return (f"download torchvision's ImageNet {net} weights ({name}) on a connected machine and pass "
            f"--config.metrics.lpips_trunk=PATH (or put it in {torch_hub_checkpoints()})")


def resolve_lpips_files(net: str = "alex", trunk: str | None = None, heads: str | None = None):
    """``(trunk_path, heads_path)`` for ``net``; CheckpointError when a file cannot be found or fetched."""
    if net not in TRUNKS:
        raise ConfigError(f"LPIPS net must be one of {tuple(TRUNKS)}, got {net!r}")
    spec = TRUNKS[net]
    fname = spec.url.rsplit("/", 1)[-1]
    trunk_path = resolve_file(trunk, what=f"LPIPS {net} trunk weights ({fname})",
                              candidates=[torch_hub_checkpoints() / fname], url=spec.url, hint=_trunk_hint(net))
    heads_path = resolve_file(
        heads, what=f"LPIPS v0.1 {net} linear heads",
        candidates=[package_file("lpips", "weights", "v0.1", f"{net}.pth")],
        url=HEADS_URL.format(net=net),
        hint=f"pip install lpips --no-deps (it ships weights/v0.1/{net}.pth) or pass --config.metrics.lpips_heads=PATH",
    )
    return trunk_path, heads_path


def lpips_flat_from_torch(net: str, trunk_sd: dict[str, np.ndarray], heads_sd: dict[str, np.ndarray]) -> dict:
    """torchvision trunk + lpips heads state dicts -> ``{flax_path: array}`` (channels-last kernels)."""
    spec = TRUNKS[net]
    flat = {}
    for i, (ti, (cin, cout, k, _, _)) in enumerate(zip(spec.torch_index, spec.convs)):
        for name in ("weight", "bias"):
            key = f"features.{ti}.{name}"
            if key not in trunk_sd:
                raise CheckpointError(f"LPIPS {net} trunk weights lack {key}")
            arr = np.asarray(trunk_sd[key], np.float32)
            want = (cout, cin, k, k) if name == "weight" else (cout,)
            if arr.shape != want:
                raise CheckpointError(f"LPIPS {net} trunk {key} has shape {list(arr.shape)}, expected {list(want)}")
            flat[("convs", i, "kernel" if name == "weight" else "bias")] = arr.transpose(2, 3, 1, 0) if name == "weight" else arr
    for j, c in enumerate(spec.tap_channels):
        key = next((k for k in (f"lin{j}.model.1.weight", f"lin{j}.weight") if k in heads_sd), None)
        if key is None:
            raise CheckpointError(f"LPIPS {net} heads lack lin{j}.model.1.weight")
        arr = np.asarray(heads_sd[key], np.float32)
        if arr.size != c:
            raise CheckpointError(f"LPIPS {net} head {key} has {arr.size} weights, expected {c}")
        flat[("heads", j)] = arr.reshape(c)
    return flat


def build_lpips(net: str, flat: dict) -> LPIPS:
    from m3ddm_jax.interop.keymap import state_from_flat  # noqa: PLC0415

    abstract = nnx.eval_shape(lambda: LPIPS(net, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, state_from_flat(abstract_state, flat))


def load_lpips(net: str = "alex", trunk: str | None = None, heads: str | None = None) -> LPIPS:
    """The LPIPS model with weights from ``trunk`` / ``heads`` specs (defaults: torchvision + lpips v0.1)."""
    trunk_path, heads_path = resolve_lpips_files(net, trunk, heads)
    return build_lpips(net, lpips_flat_from_torch(net, read_arrays(trunk_path), read_arrays(heads_path)))
