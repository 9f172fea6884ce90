"""Reading and writing PyTorch-format state dicts as ``{key: numpy array}``.

``.safetensors`` is read and written without torch, one tensor at a time (:mod:`.tensor_files`).
``.bin`` (a ``torch.save`` pickle) needs torch; it is loaded with ``weights_only=True`` (memory-mapped).
Arrays keep their stored dtype (fp16 stays fp16, int64 stays int64).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from m3ddm_jax.errors import CheckpointError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def find_torch_weights(folder: str | os.PathLike) -> Path:
    """The weights file of a diffusers model folder (safetensors preferred, as diffusers does)."""
    folder = Path(folder)
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no {' or '.join(WEIGHT_NAMES)} in {folder}")


def _import_torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "reading or writing a PyTorch .bin checkpoint needs torch (pip install torch); "
            "or convert it to .safetensors first"
        ) from e
    return torch


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``.safetensors`` or ``.bin`` state dict as numpy arrays (all in memory; a model is loaded through
    :func:`~m3ddm_jax.interop.tensor_files.open_tensor_file`, one tensor at a time, instead)."""
    from m3ddm_jax.interop.tensor_files import open_tensor_file  # noqa: PLC0415

    with open_tensor_file(path) as src:
        return {k: src[k] for k in src}


def write_state_dict(sd: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a state dict; ``.safetensors`` needs no torch, ``.bin`` is a ``torch.save`` zip pickle.

    The file is written to a temporary dot-name in the same folder and renamed over ``path`` when complete, so
    a failed write (a full disk included) leaves ``path`` as it was and no partial file; a write error is a
    one-line :class:`CheckpointError`.
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".bin"):
        raise CheckpointError(f"unknown weights file type {path.suffix!r}: {path}")
    from m3ddm_jax.atomic import WriteError, default_mode, fsync_path, new_file, reason, remove  # noqa: PLC0415

    tmp = new_file(path)  # .<name>.partial-<pid>-<random><suffix>, mode 0o666 minus the umask
    try:
        if path.suffix == ".safetensors":  # one tensor in memory at a time (``sd`` may convert on lookup)
            from m3ddm_jax.interop.tensor_files import dtype_of, shape_of, write_safetensors  # noqa: PLC0415

            write_safetensors(tmp, [(k, shape_of(sd, k), dtype_of(sd, k)) for k in sd], sd.__getitem__)
        else:
            torch = _import_torch()
            from collections import OrderedDict  # noqa: PLC0415

            def to_tensor(v):
                v = np.array(v)
                if v.dtype.name == "bfloat16":  # torch.from_numpy does not know ml_dtypes.bfloat16
                    return torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
                return torch.from_numpy(v)

            with open(tmp, "wb") as f:  # a Python file: a full disk surfaces as its OSError, not only torch's message
                torch.save(OrderedDict((k, to_tensor(v)) for k, v in sd.items()), f)
        default_mode(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except CheckpointError:
        raise
    except Exception as e:  # a full disk, a read-only folder: safetensors / torch raise their own types
        raise WriteError(path, reason(e)) from e
    finally:
        remove(tmp)
