"""Evaluation protocols and the batched per-frame scorer shared by ``eval.py`` and training validation.

Two protocols; every report names the one it used:

``reference``
    The M3DDM+ evaluation (``src/evaluate.py``) as it runs, so numbers compare with the paper:
    ground truth resized with **bilinear** interpolation (``cv2.INTER_AREA`` lands in the ``dst`` slot,
    spec section 9 item 24); ground-truth and input frames through JPEG quality 95 and generated frames
    through JPEG quality 75 (the reference's ``cv2.imwrite`` / PIL saves; its final lossy MP4 encode is not
    reproduced); metrics over the **whole frame** (known centre included); LPIPS fed **BGR**; BMSE's
    Gaussian blur also across the 3 colour channels (scalar sigma 5 on ``H x W x 3``, scipy ``reflect``,
    ``truncate`` 4).
``clean``
    The same numbers with the faults fixed: **area** resize, no JPEG round trips, RGB into LPIPS, blur over
    H and W only, and every metric except FVD also on the **generated region alone** (``*_gen`` columns:
    pixels with mask 1).

Both protocols cap per-frame PSNR at :data:`~m3ddm_jax.metrics.image.PSNR_MAX_DB` (the reference would give
``inf`` for identical frames) and score frames ``0 .. min(len(gt), len(gen)) - 1``; per-video value = mean
over frames; reported value = mean over videos (FVD: over the pooled clips of all videos).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.errors import ConfigError
from m3ddm_jax.metrics import image as im

FRAME_METRICS = ("mse", "psnr", "ssim", "lpips", "bmse")
TABLE_METRICS = ("mse", "psnr", "ssim", "lpips", "fvd", "bmse")


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    resize: str                 # ground-truth resize: "bilinear" (reference) or "area"
    jpeg_gt: int | None         # JPEG quality applied to ground-truth and input frames (None: none)
    jpeg_gen: int | None        # JPEG quality applied to generated frames
    lpips_bgr: bool             # feed LPIPS BGR frames
    blur_channels: bool         # BMSE blur also across channels
    region: bool                # also score the generated region alone

    def describe(self) -> str:
        return (f"{self.name}: {self.resize} resize, "
                f"{'JPEG q%d GT/input, q%d generated' % (self.jpeg_gt, self.jpeg_gen) if self.jpeg_gt else 'no JPEG'}, "
                f"LPIPS fed {'BGR' if self.lpips_bgr else 'RGB'}, BMSE blur over "
                f"{'H, W and channels' if self.blur_channels else 'H and W'}, whole frame"
                f"{' + generated region' if self.region else ''}")


PROTOCOLS = {
    "reference": Protocol("reference", "bilinear", 95, 75, True, True, False),
    "clean": Protocol("clean", "area", None, None, False, False, True),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {tuple(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name]


def metric_names(protocol: Protocol, with_lpips: bool = True) -> tuple[str, ...]:
    base = tuple(m for m in FRAME_METRICS if with_lpips or m != "lpips")
    return base + tuple(f"{m}_gen" for m in base) if protocol.region else base


def _frame_metrics(gt, gen, region, lpips_model, *, protocol: Protocol, psnr_max: float):
    """gt, gen float [0, 1] ``(N, H, W, 3)`` RGB; region ``(H, W)`` 1 = generated. Returns per-frame dict."""
    out = {}
    for suffix, w in (("", None),) + ((("_gen", region),) if protocol.region else ()):
        m = im.mse(gt, gen, w)
        out["mse" + suffix] = m
        out["psnr" + suffix] = im.psnr_from_mse(m, psnr_max)
        out["ssim" + suffix] = im.ssim(gt, gen, w)
        out["bmse" + suffix] = im.bmse(gen, im.BMSE_SIGMA, protocol.blur_channels, w)
        if lpips_model is not None:
            a, b = gt * 2 - 1, gen * 2 - 1
            if protocol.lpips_bgr:
                a, b = a[..., ::-1], b[..., ::-1]
            out["lpips" + suffix] = lpips_model(a, b, w)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "protocol", "psnr_max"))
def _score_chunk(graphdef, state, gt_u8, gen_u8, region, *, protocol, psnr_max):
    model = nnx.merge(graphdef, state) if graphdef is not None else None
    return _frame_metrics(im.to_unit(gt_u8), im.to_unit(gen_u8), region, model, protocol=protocol, psnr_max=psnr_max)


class FrameScorer:
    """Per-frame metrics of generated frames against ground truth, jitted over fixed-size chunks.

    ``scorer(gt_u8, gen_u8, region)`` with uint8 RGB ``(N, H, W, 3)`` arrays and ``region (H, W)`` (1 on
    generated pixels; needed by the ``clean`` protocol's ``*_gen`` metrics) returns ``{name: (N,) float64}``.
    ``lpips=None`` leaves LPIPS out.
    """

    def __init__(self, protocol: Protocol | str = "reference", lpips=None, batch: int = 8,
                 psnr_max: float = im.PSNR_MAX_DB):
        self.protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
        self.graphdef, self.state = nnx.split(lpips) if lpips is not None else (None, None)
        self.batch = max(1, int(batch))
        self.psnr_max = float(psnr_max)

    @property
    def names(self) -> tuple[str, ...]:
        return metric_names(self.protocol, self.graphdef is not None)

    def __call__(self, gt_u8: np.ndarray, gen_u8: np.ndarray, region: np.ndarray | None = None) -> dict[str, np.ndarray]:
        gt_u8, gen_u8 = np.asarray(gt_u8), np.asarray(gen_u8)
        n = min(len(gt_u8), len(gen_u8))
        if gt_u8.shape[1:] != gen_u8.shape[1:]:
            raise ConfigError(f"generated frames {gen_u8.shape[1:]} and ground truth {gt_u8.shape[1:]} differ in size")
        if n == 0:
            raise ConfigError("no frames to score")
        if region is None:
            region = np.ones(gt_u8.shape[1:3], np.float32)
        region = jnp.asarray(region, jnp.float32)
        parts: dict[str, list] = {}
        for i in range(0, n, self.batch):
            a, b = gt_u8[i:min(i + self.batch, n)], gen_u8[i:min(i + self.batch, n)]
            k = len(a)
            if k < self.batch:
                a = np.concatenate([a, np.repeat(a[-1:], self.batch - k, 0)])
                b = np.concatenate([b, np.repeat(b[-1:], self.batch - k, 0)])
            res = _score_chunk(self.graphdef, self.state, jnp.asarray(a), jnp.asarray(b), region,
                               protocol=self.protocol, psnr_max=self.psnr_max)
            for key, v in res.items():
                parts.setdefault(key, []).append(np.asarray(v, np.float64)[:k])
        return {k: np.concatenate(v) for k, v in parts.items()}
