"""Video outpainting metrics: one implementation for ``eval.py`` and for training validation.

* :mod:`~m3ddm_jax.metrics.image` - MSE, PSNR (capped at 100 dB), SSIM (skimage-exact), Gaussian blur
  (scipy-exact) and BMSE, as pure jittable JAX functions on ``(N, H, W, C)`` frames in [0, 1];
* :mod:`~m3ddm_jax.metrics.lpips` - LPIPS v0.1 (AlexNet, or VGG-16) in Flax NNX, torch weights loaded;
* :mod:`~m3ddm_jax.metrics.fvd` - I3D (Kinetics-400) in Flax NNX, clip embeddings and the Fréchet distance;
* :mod:`~m3ddm_jax.metrics.protocol` - the ``reference`` and ``clean`` protocols and :class:`FrameScorer`
  (all per-frame metrics of a video in jitted fixed-size chunks).

Typical use (training validation)::

    from m3ddm_jax.metrics import FrameScorer, load_lpips
    scorer = FrameScorer("clean", lpips=load_lpips("alex"))
    per_frame = scorer(gt_uint8, generated_uint8, region_mask)   # {"mse": (N,), "psnr": ..., ...}
"""
from m3ddm_jax.metrics.fvd import I3D, I3DFeatures, frechet_distance, fvd_from_features, load_i3d, resolve_i3d_file
from m3ddm_jax.metrics.image import PSNR_MAX_DB, bmse, gaussian_blur, mse, psnr, ssim
from m3ddm_jax.metrics.lpips import LPIPS, load_lpips, resolve_lpips_files
from m3ddm_jax.metrics.protocol import (FRAME_METRICS, PROTOCOLS, TABLE_METRICS, FrameScorer, Protocol,
                                        get_protocol, metric_names)

__all__ = [
    "I3D", "I3DFeatures", "frechet_distance", "fvd_from_features", "load_i3d", "resolve_i3d_file",
    "PSNR_MAX_DB", "bmse", "gaussian_blur", "mse", "psnr", "ssim",
    "LPIPS", "load_lpips", "resolve_lpips_files",
    "FRAME_METRICS", "PROTOCOLS", "TABLE_METRICS", "FrameScorer", "Protocol", "get_protocol", "metric_names",
]
