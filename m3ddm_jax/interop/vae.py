"""PyTorch (diffusers ``AutoencoderKL``) <-> Flax conversion of the VAE, and loading/saving.

* :func:`load_vae` reads a converted Flax folder (``config.json`` with the ``_m3ddm_jax`` tag +
  ``flax_model.safetensors``) or a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
  or ``.bin``; a pipeline folder with a ``vae/`` subfolder works too), converting on the fly.
* :func:`save_vae_flax` writes the Flax folder; :func:`export_vae_torch` writes a diffusers folder that
  ``AutoencoderKL.from_pretrained`` loads.

Keys: the Flax path is the diffusers key (``kernel``/``scale`` for ``weight``). Older SD-1.5 files name the
mid-block attention ``query/key/value/proj_attn`` (sometimes with 1x1-conv shaped ``(C, C, 1, 1)`` weights);
they are read as ``to_q/to_k/to_v/to_out.0``. Export always writes the current names.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.errors import CheckpointError
from m3ddm_jax.interop.flax_io import is_flax_folder, open_flax_folder, read_config, save_flax_folder
from m3ddm_jax.interop.keymap import KeyTable, Path as FlaxPath, flat_arrays, state_from_flat
from m3ddm_jax.interop.tensor_files import open_tensor_file
from m3ddm_jax.interop.torch_io import find_torch_weights, write_state_dict
from m3ddm_jax.models.vae import AutoencoderKL, VAEConfig, as_vae_config, vae_from_config

__all__ = [
    "canonical_key",
    "vae_key_table",
    "abstract_vae",
    "vae_torch_to_flax",
    "vae_flax_to_torch",
    "load_vae",
    "save_vae_flax",
    "export_vae_torch",
    "vae_from_config",
]

KIND = "vae"
TORCH_WEIGHTS = {"safetensors": "diffusion_pytorch_model.safetensors", "bin": "diffusion_pytorch_model.bin"}

_LEGACY_ATTN = re.compile(r"^(?P<prefix>.*\.attentions\.\d+)\.(?P<name>query|key|value|proj_attn)\.(?P<leaf>weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def canonical_key(key: str) -> str:
    """Map the legacy attention spellings (``query/key/value/proj_attn``) to ``to_q/to_k/to_v/to_out.0``."""
    m = _LEGACY_ATTN.match(key)
    if m is None:
        return key
    return f"{m['prefix']}.{_LEGACY_NAMES[m['name']]}.{m['leaf']}"


def _torch_ndim(torch_key: str, flax_shape: tuple) -> int:
    # Every VAE conv is 2-D in both frameworks (1x1 convs keep their (1, 1) kernel in Flax) and every
    # Linear is a Flax Linear, so ranks agree.
    return len(flax_shape)


def abstract_vae(config: VAEConfig | Mapping[str, Any], **model_kwargs) -> AutoencoderKL:
    """The model with ``ShapeDtypeStruct`` leaves (no memory allocated)."""
    cfg = as_vae_config(config)
    return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), **model_kwargs))


@functools.lru_cache(maxsize=8)
def _table(cfg: VAEConfig) -> KeyTable:
    _, state = nnx.split(abstract_vae(cfg))
    return KeyTable.from_state(state, _torch_ndim, canonical_key, name="VAE")


def vae_key_table(config: VAEConfig | Mapping[str, Any]) -> KeyTable:
    """The Flax-variable <-> diffusers-key table of the VAE with ``config`` (built on abstract shapes)."""
    return _table(as_vae_config(config))


def vae_torch_to_flax(
    state_dict: Mapping[str, np.ndarray], config: VAEConfig | Mapping[str, Any], source: str = "VAE checkpoint"
) -> dict[FlaxPath, np.ndarray]:
    """diffusers state dict (numpy arrays, any key spelling) -> ``{flax_path: array}``; dtypes are kept."""
    return vae_key_table(config).to_flax(state_dict, source=source)


def vae_flax_to_torch(
    flat: Mapping[FlaxPath, np.ndarray], config: VAEConfig | Mapping[str, Any], dtype=None
) -> "OrderedDict[str, np.ndarray]":
    """``{flax_path: array}`` -> diffusers state dict (current key names; floats cast to ``dtype`` if given)."""
    return vae_key_table(config).to_torch(flat, dtype=None if dtype is None else np.dtype(dtype))


def _build(cfg: VAEConfig, flat: Mapping[FlaxPath, np.ndarray], dtype, **model_kwargs) -> AutoencoderKL:
    kw = dict(model_kwargs)
    if dtype is not None:
        kw.setdefault("dtype", dtype)
        kw.setdefault("param_dtype", dtype)
    graphdef, abstract_state = nnx.split(abstract_vae(cfg, **kw))
    return nnx.merge(graphdef, state_from_flat(abstract_state, flat, dtype))


def _resolve_folder(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"VAE weights not found: {path}")
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass the VAE folder (config.json + weights)")
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return path / "vae"  # a diffusers pipeline folder
    return path


def load_vae(path: str | os.PathLike, dtype=jnp.float32, **model_kwargs) -> AutoencoderKL:
    """Load a VAE from a converted Flax folder or a diffusers (PyTorch) VAE folder.

    ``dtype``: parameter and computation dtype (``None`` keeps the stored dtype and lets computations follow
    the inputs). ``model_kwargs`` go to :class:`AutoencoderKL` (``attention_impl``, ``query_chunk``).
    The model is assembled from the abstract state, so no random weights are ever allocated, and the file is
    read one tensor at a time straight into the model's buffers (no state dict is held beside them).
    """
    folder = _resolve_folder(Path(path))
    if is_flax_folder(folder):
        kind, raw_cfg, flat = open_flax_folder(folder)
        try:
            if kind != KIND:
                raise CheckpointError(f"{folder} holds converted {kind!r} weights, not a VAE")
            cfg = VAEConfig.from_dict(raw_cfg)
            vae_key_table(cfg).check(flat)  # names every missing / unknown / mis-shaped variable
        except BaseException:
            flat.source.close()
            raise
    else:
        cfg = VAEConfig.from_dict(read_config(folder))
        weights = find_torch_weights(folder)
        flat = vae_key_table(cfg).to_flax_lazy(open_tensor_file(weights), source=str(weights))
    try:
        return _build(cfg, flat, dtype, **model_kwargs)
    finally:
        flat.source.close()


def _model_flat(model: AutoencoderKL) -> dict[FlaxPath, np.ndarray]:
    return flat_arrays(nnx.state(model, nnx.Param))


def save_vae_flax(
    model_or_flat: AutoencoderKL | Mapping[FlaxPath, np.ndarray],
    config: VAEConfig | Mapping[str, Any] | None,
    folder: str | os.PathLike,
) -> Path:
    """Write the converted Flax folder (``config`` may be ``None`` when a model is given)."""
    if isinstance(model_or_flat, AutoencoderKL):
        cfg = model_or_flat.config if config is None else as_vae_config(config)
        flat = _model_flat(model_or_flat)
    else:
        if config is None:
            raise ValueError("save_vae_flax: a config is needed with a flat weight dict")
        cfg, flat = as_vae_config(config), dict(model_or_flat)
    vae_key_table(cfg).check(flat)  # refuse to write weights that do not fit the config (shapes only)
    return save_flax_folder(folder, KIND, cfg.to_dict(), flat)


def export_vae_torch(
    source: str | os.PathLike | AutoencoderKL,
    out_folder: str | os.PathLike,
    fmt: str = "safetensors",
    dtype=None,
) -> Path:
    """Write a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.{safetensors,bin}``).

    ``source`` is a converted Flax folder or a model; ``dtype`` casts the floats (default: as stored).
    """
    if fmt not in TORCH_WEIGHTS:
        raise ValueError(f"export_vae_torch: fmt must be one of {sorted(TORCH_WEIGHTS)}, got {fmt!r}")
    if isinstance(source, AutoencoderKL):
        cfg, flat = source.config, _model_flat(source)
    else:
        folder = _resolve_folder(Path(source))
        if not is_flax_folder(folder):
            raise CheckpointError(f"{folder} is not a converted Flax VAE folder (no flax_model.safetensors)")
        kind, raw_cfg, flat = open_flax_folder(folder)
        if kind != KIND:
            raise CheckpointError(f"{folder} holds converted {kind!r} weights, not a VAE")
        cfg = VAEConfig.from_dict(raw_cfg)
    state_dict = vae_key_table(cfg).to_torch_lazy(flat, dtype=None if dtype is None else np.dtype(dtype))
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    for other in TORCH_WEIGHTS.values():  # a stale file of the other format would shadow or confuse loaders
        if other != TORCH_WEIGHTS[fmt] and (out / other).exists():
            (out / other).unlink()
    write_state_dict(state_dict, out / TORCH_WEIGHTS[fmt])
    from m3ddm_jax.atomic import atomic_file  # noqa: PLC0415

    with atomic_file(out / "config.json") as tmp:  # weights first, then the config: never a half-written file
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return out
