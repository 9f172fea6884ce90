"""PyTorch <-> Flax conversion and loading of the M3DDM 3D U-Net.

* :func:`unet_key_table` - the 1:1 map between the Flax variables and the released state-dict keys
  (built from an abstract model, nothing allocated).
* :func:`unet_torch_to_flax` / :func:`unet_flax_to_torch` - state-dict <-> ``{flax_path: array}``; dtypes are
  kept unless asked (an fp16 release stays fp16), ``num_batches_tracked`` is int64 in PyTorch, int32 in JAX.
* :func:`load_unet` - a model from a converted Flax folder or from a PyTorch diffusers folder
  (``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``, converted on the fly), read one tensor
  at a time straight into the model's buffers: the weights are in memory once (no state dict beside them).
* :func:`save_unet_flax` / :func:`export_unet_torch` - write the Flax folder / the released PyTorch layout.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.errors import CheckpointError
from m3ddm_jax.interop.flax_io import is_flax_folder, open_flax_folder, read_config, save_flax_folder
from m3ddm_jax.interop.keymap import KeyTable, cast_floats, flat_arrays, path_to_str, shape_of, state_from_flat
from m3ddm_jax.interop.tensor_files import open_tensor_file
from m3ddm_jax.interop.torch_io import find_torch_weights, read_state_dict, write_state_dict
from m3ddm_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig, as_config

KIND = "unet"
TORCH_WEIGHT_FILES = {"safetensors": "diffusion_pytorch_model.safetensors", "bin": "diffusion_pytorch_model.bin"}


def abstract_unet(config, **model_options) -> UNet3DConditionModel:
    """The U-Net with ``jax.ShapeDtypeStruct`` leaves (``nnx.eval_shape``): no weights allocated."""
    cfg = as_config(config)
    return nnx.eval_shape(lambda: UNet3DConditionModel(cfg, rngs=nnx.Rngs(0), **model_options))


def _torch_ranks(model: nnx.Module) -> dict[str, int]:
    """``{module path: rank of its PyTorch weight}`` for every layer that declares ``torch_rank``."""
    ranks = {}
    for path, module in nnx.iter_modules(model):
        rank = getattr(module, "torch_rank", None)
        if rank is not None:
            ranks[path_to_str(path)] = rank
    return ranks


@functools.lru_cache(maxsize=8)
def _key_table_cached(config: UNet3DConfig) -> KeyTable:
    model = abstract_unet(config)
    ranks = _torch_ranks(model)

    def torch_ndim(torch_key: str, flax_shape: tuple) -> int:
        if len(flax_shape) <= 1:
            return len(flax_shape)
        module = torch_key.rsplit(".", 1)[0]
        if module not in ranks:
            raise ValueError(f"no PyTorch rank known for {torch_key}")
        return ranks[module]

    return KeyTable.from_state(nnx.state(model), torch_ndim, name="M3DDM U-Net")


def unet_key_table(config) -> KeyTable:
    """The key table of the U-Net of ``config`` (cached per config)."""
    return _key_table_cached(as_config(config))


def unet_torch_to_flax(state_dict: Mapping[str, np.ndarray], config, source: str = "checkpoint") -> dict:
    """PyTorch state dict -> ``{flax_path: array}``; CheckpointError names any missing/unexpected/reshaped key."""
    return unet_key_table(config).to_flax(state_dict, source)


def unet_flax_to_torch(flat: Mapping[tuple, np.ndarray], config, dtype=None) -> dict[str, np.ndarray]:
    """``{flax_path: array}`` -> PyTorch state dict (float tensors cast to ``dtype`` if given)."""
    return unet_key_table(config).to_torch(flat, None if dtype is None else np.dtype(_np_dtype(dtype)))


def _np_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16", "half": "float16",
                 "float": "float32"}.get(dtype, dtype)
    return jnp.dtype(dtype)


def build_unet(config, flat: Mapping[tuple, np.ndarray], weights_dtype=jnp.float32,
               **model_options) -> UNet3DConditionModel:
    """A model whose variables are ``flat`` (floats cast to ``weights_dtype``; ``None`` keeps them), built
    from the abstract state (no random weights are allocated first), one variable at a time.
    ``model_options`` go to :class:`UNet3DConditionModel` (``dtype`` = compute dtype)."""
    cfg = as_config(config)
    wdt = None if weights_dtype is None else _np_dtype(weights_dtype)
    model_options.setdefault("param_dtype", wdt if wdt is not None else jnp.float32)
    graphdef, abstract_state = nnx.split(abstract_unet(cfg, **model_options))
    return nnx.merge(graphdef, state_from_flat(abstract_state, flat, wdt))


def read_torch_unet(folder: str | os.PathLike) -> tuple[UNet3DConfig, dict[str, np.ndarray], Path]:
    """``(config, state_dict, weights path)`` of a PyTorch diffusers U-Net folder."""
    folder = Path(folder)
    cfg = UNet3DConfig.from_dict(read_config(folder))
    path = find_torch_weights(folder)
    return cfg, read_state_dict(path), path


def load_unet_flat(path: str | os.PathLike) -> tuple[UNet3DConfig, Mapping[tuple, np.ndarray]]:
    """``(config, {flax_path: array})`` from a converted Flax folder or a PyTorch folder (converted on the fly).

    Keys, shapes and dtypes are checked now; the mapping (a :class:`~m3ddm_jax.interop.keymap.LazyFlat`)
    reads and converts one tensor per lookup and caches nothing."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"U-Net folder not found: {path}")
    if is_flax_folder(path):
        kind, cfg_dict, flat = open_flax_folder(path)
        if kind and kind != KIND:
            raise CheckpointError(f"{path} holds a converted {kind!r}, not a U-Net")
        cfg = UNet3DConfig.from_dict(cfg_dict)
        table = unet_key_table(cfg)
        expected = {e.flax_path: e.flax_shape for e in table.entries}
        missing = sorted(path_to_str(p) for p in set(expected) - set(flat))
        extra = sorted(path_to_str(p) for p in set(flat) - set(expected))
        if missing or extra:
            raise CheckpointError(
                f"{path}: Flax weights do not fit the U-Net: "
                + (f"missing {', '.join(missing[:6])}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {', '.join(extra[:6])}" if extra else "")
            )
        for p, shape in expected.items():
            if shape_of(flat, p) != shape:
                raise CheckpointError(
                    f"{path}: variable {path_to_str(p)} has shape {list(shape_of(flat, p))}, the U-Net needs {list(shape)}")
        return cfg, flat
    cfg = UNet3DConfig.from_dict(read_config(path))
    wpath = find_torch_weights(path)
    return cfg, unet_key_table(cfg).to_flax_lazy(open_tensor_file(wpath), source=str(wpath))


def load_unet(path: str | os.PathLike, dtype=jnp.float32, **model_options) -> UNet3DConditionModel:
    """Load the U-Net from a converted Flax folder or a PyTorch diffusers folder (fp16 or fp32 weights).

    ``dtype``: dtype of the loaded parameters (``None`` keeps the stored dtype); ``model_options`` go to
    :class:`UNet3DConditionModel` (``dtype=`` there is the *compute* dtype: pass it as ``compute_dtype``
    here, e.g. ``load_unet(p, jnp.float32, compute_dtype=jnp.bfloat16)``; ``attention_impl``,
    ``attention_budget_mib``, ``remat``, ``precision``).
    """
    compute_dtype = model_options.pop("compute_dtype", None)
    cfg, flat = load_unet_flat(path)
    try:
        return build_unet(cfg, flat, dtype, dtype=compute_dtype, **model_options)
    finally:
        flat.source.close()


def unet_flat(model: UNet3DConditionModel) -> dict[tuple, np.ndarray]:
    """``{flax_path: numpy array}`` of every variable of a model (parameters and BatchNorm statistics)."""
    return flat_arrays(nnx.state(model))


def save_unet_flax(model_or_flat, folder: str | os.PathLike, config=None, dtype=None) -> Path:
    """Write a converted Flax folder (``config.json`` + ``flax_model.safetensors``) from a model, or from
    ``{flax_path: array}`` plus ``config``; floats cast to ``dtype`` if given."""
    if isinstance(model_or_flat, nnx.Module):
        cfg = model_or_flat.config
        flat = unet_flat(model_or_flat)
    else:
        if config is None:
            raise ValueError("save_unet_flax: pass the config with a flat weight dict")
        cfg, flat = as_config(config), dict(model_or_flat)
    table = unet_key_table(cfg)
    flat = cast_floats(_check_flat(flat, table), None if dtype is None else _np_dtype(dtype))
    return save_flax_folder(folder, KIND, cfg.to_dict(), flat)  # converted and written one tensor at a time


def _check_flat(flat: Mapping[tuple, np.ndarray], table: KeyTable) -> Mapping:
    table.check(flat)  # raises CheckpointError naming missing/extra/mis-shaped variables (nothing is read)
    return flat


def export_unet_torch(src, out_folder: str | os.PathLike, fmt: str = "safetensors", dtype=None,
                      config=None) -> Path:
    """Write a PyTorch diffusers U-Net folder (``config.json`` with ``_class_name`` UNet3DConditionModel and
    ``diffusion_pytorch_model.{safetensors,bin}``) in the released key/shape layout, loadable by the
    reference's ``UNet3DConditionModel.from_pretrained``.

    ``src``: a model, a converted Flax folder, a PyTorch folder, or ``{flax_path: array}`` (with ``config``).
    ``dtype``: float dtype of the written tensors (``None`` keeps the source dtype; ``num_batches_tracked``
    is always int64).
    """
    if fmt not in TORCH_WEIGHT_FILES:
        raise CheckpointError(f"unknown PyTorch weight format {fmt!r} (choose safetensors or bin)")
    if isinstance(src, nnx.Module):
        cfg, flat = src.config, unet_flat(src)
    elif isinstance(src, (str, os.PathLike)):
        cfg, flat = load_unet_flat(src)
    else:
        if config is None:
            raise ValueError("export_unet_torch: pass the config with a flat weight dict")
        cfg, flat = as_config(config), dict(src)
    sd = unet_key_table(cfg).to_torch_lazy(flat, None if dtype is None else np.dtype(_np_dtype(dtype)))
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    write_state_dict(sd, out / TORCH_WEIGHT_FILES[fmt])
    from m3ddm_jax.atomic import atomic_file  # noqa: PLC0415

    with atomic_file(out / "config.json") as tmp:  # weights first, then the config: never a half-written file
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return out
