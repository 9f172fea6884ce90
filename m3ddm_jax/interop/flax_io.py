"""The converted Flax weight format.

A converted model is a folder holding

* ``config.json``: the model's diffusers config (the same fields as the PyTorch release) plus
  ``"_m3ddm_jax": {"format": "flax-safetensors", "version": 1, "kind": "unet" | "vae"}``;
* ``flax_model.safetensors``: every Flax variable (parameters and BatchNorm statistics) under its
  dotted Flax path (``down_blocks.0.resnets.1.conv1.spatial_conv.kernel``), channels-last layouts,
  dtype as converted (fp16 releases stay fp16 unless a dtype is asked for).

safetensors was chosen over orbax for released weights: one memory-mappable file, no torch or TensorFlow
needed to read it, loadable lazily for abstract-shape checks. Training checkpoints (which also hold
optimizer state, step and data-iterator state) use orbax; see ``m3ddm_jax.train``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from m3ddm_jax.errors import CheckpointError, UserError
from m3ddm_jax.interop.keymap import path_to_str, str_to_path

FLAX_WEIGHTS = "flax_model.safetensors"
CONFIG = "config.json"
FORMAT_TAG = "flax-safetensors"
FORMAT_VERSION = 1


def is_flax_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / FLAX_WEIGHTS).is_file()


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in {folder}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return cfg


def save_flax_folder(folder: str | os.PathLike, kind: str, config: Mapping, flat: Mapping[tuple, np.ndarray]) -> Path:
    """Write ``config.json`` + ``flax_model.safetensors`` atomically.

    A new folder is written under a temporary dot-name and renamed; into an existing folder, each of the two
    files replaces its namesake atomically (weights first, config last) and nothing else in the folder is
    touched. A failure (a full disk included) leaves no partial file; write errors are one-line
    :class:`CheckpointError` messages. Files and folders get the user's umask.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    from m3ddm_jax.atomic import WriteError, atomic_file, default_mode, new_dir, reason, remove  # noqa: PLC0415

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder")
    cfg = {k: v for k, v in dict(config).items() if k != "_m3ddm_jax"}
    cfg["_m3ddm_jax"] = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "kind": kind}
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    # each array read once (``flat`` may read on lookup); keeps 0-d arrays 0-d
    arrays = {path_to_str(p): np.require(np.asarray(flat[p]), requirements="C") for p in flat}

    def write_weights(path: Path) -> None:
        try:
            save_file(arrays, str(path))
        except Exception as e:  # safetensors raises its own error type on a full disk
            raise OSError(reason(e)) if not isinstance(e, OSError) else e

    try:
        if folder.is_dir():
            with atomic_file(folder / FLAX_WEIGHTS) as tmp:
                write_weights(tmp)
            with atomic_file(folder / CONFIG) as tmp:
                tmp.write_text(text)
            return folder
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create {folder.parent}: {reason(e)}") from e
        tmp = new_dir(folder)
        try:
            (tmp / CONFIG).write_text(text)
            write_weights(tmp / FLAX_WEIGHTS)
            for f in (tmp / CONFIG, tmp / FLAX_WEIGHTS):
                default_mode(f)
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, folder)
        except OSError as e:
            raise WriteError(folder, reason(e)) from e
        finally:
            remove(tmp)
    except CheckpointError:
        raise
    except UserError as e:
        raise WriteError(folder, str(e)) from e
    return folder


def open_flax_folder(folder: str | os.PathLike):
    """Open a converted folder without reading its weights: ``(kind, config, {flax_path: array})`` where the
    mapping (a :class:`~m3ddm_jax.interop.keymap.LazyFlat`) reads each variable from the file when indexed."""
    from m3ddm_jax.interop.keymap import LazyFlat  # noqa: PLC0415
    from m3ddm_jax.interop.tensor_files import SafetensorsFile  # noqa: PLC0415

    folder = Path(folder)
    cfg = read_config(folder)
    tag = cfg.get("_m3ddm_jax") or {}
    if tag.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{folder / CONFIG} is not an m3ddm-jax Flax config (no _m3ddm_jax format tag)")
    if tag.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by a newer m3ddm-jax (format version {tag.get('version')})")
    source = SafetensorsFile(folder / FLAX_WEIGHTS)
    return tag.get("kind", ""), cfg, LazyFlat.identity(source, {str_to_path(k): k for k in source})


def load_flax_folder(folder: str | os.PathLike) -> tuple[str, dict, dict[tuple, np.ndarray]]:
    """Read a converted folder: ``(kind, config, {flax_path: array})`` (every array in memory; loading a model
    goes through :func:`open_flax_folder` instead)."""
    kind, cfg, lazy = open_flax_folder(folder)
    try:
        return kind, cfg, {p: lazy[p] for p in lazy}
    finally:
        lazy.source.close()
