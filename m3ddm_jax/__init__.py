"""m3ddm-jax: M3DDM / M3DDM+ video outpainting in JAX/Flax.

The public face (every name below is a function or class; subpackages keep their own names)::

    from m3ddm_jax import M3DDMPipeline, export_to_video

    pipe = M3DDMPipeline.from_pretrained("weights")   # `python -m m3ddm_jax.download weights` made it
    result = pipe("clip.mp4", ratio="16:9")
    export_to_video(result, "clip_16-9.mp4")

* :class:`M3DDMPipeline` - ``from_pretrained(weights)``, then call it on a video path, a Video or frames;
* :func:`export_to_video` - write a result as MP4 (source frame rate and audio kept), :func:`load_video`;
  :class:`VideoReader` / :class:`VideoWriter` - a lazy source and a frame-by-frame writer (flat memory);
* :class:`Outpainter` / :class:`OutpaintConfig` / :class:`OutpaintResult` - the engine under the pipeline;
* :func:`outpaint_video` - one-call form over frames; :func:`load_models`, :func:`load_unet`, :func:`load_vae`.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "M3DDMPipeline": "m3ddm_jax.outpaint.pipeline",
    "Outpainter": "m3ddm_jax.outpaint.pipeline",
    "OutpaintConfig": "m3ddm_jax.outpaint.pipeline",
    "OutpaintResult": "m3ddm_jax.outpaint.pipeline",
    "Progress": "m3ddm_jax.outpaint.pipeline",
    "outpaint_video": "m3ddm_jax.outpaint.pipeline",
    "export_to_video": "m3ddm_jax.video",
    "load_video": "m3ddm_jax.video",
    "VideoReader": "m3ddm_jax.video",
    "VideoWriter": "m3ddm_jax.video",
    "load_unet": "m3ddm_jax.interop.unet",
    "load_vae": "m3ddm_jax.interop.vae",
    "load_models": "m3ddm_jax.weights",
}
_ALIASES = {"load_video": "read_video"}
_SUBPACKAGES = {"assets", "data", "diffusion", "interop", "metrics", "models", "outpaint", "train", "errors",
                "masks", "video", "weights", "runtime", "cli_common", "download", "aot"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):  # lazy: ``import m3ddm_jax`` stays cheap; names resolve on first use, then stick
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), _ALIASES.get(name, name))
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'm3ddm_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBPACKAGES)
