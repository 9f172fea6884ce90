"""m3ddm-jax: M3DDM / M3DDM+ video outpainting in JAX/Flax.

The public face:

* :func:`load_unet` - the M3DDM 3D U-Net from a converted Flax folder or a PyTorch release folder;
* :func:`load_vae` - the SD-1.5 VAE from a converted Flax folder or a diffusers VAE folder;
* :func:`outpaint` - a whole video (uint8 ``(N, H, W, 3)`` frames) to a wider/taller one;
* :func:`load_models` - both models from a ``--weights`` value (local folder or Hugging Face repo id).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_unet", "load_vae", "load_models", "outpaint", "__version__"]


def __getattr__(name):  # lazy: ``import m3ddm_jax`` stays cheap, submodules load on first use
    if name == "load_unet":
        from m3ddm_jax.interop.unet import load_unet

        return load_unet
    if name == "load_vae":
        from m3ddm_jax.interop.vae import load_vae

        return load_vae
    if name == "load_models":
        from m3ddm_jax.weights import load_models

        return load_models
    if name == "outpaint":
        from m3ddm_jax.outpaint.pipeline import outpaint

        return outpaint
    raise AttributeError(f"module 'm3ddm_jax' has no attribute {name!r}")
