"""Generic PyTorch <-> Flax key tables and layout rules.

A model family (U-Net, VAE) names its NNX submodules after the PyTorch modules, so a Flax variable path
``('down_blocks', 0, 'resnets', 1, 'conv1', 'spatial_conv', 'kernel')`` corresponds to the PyTorch key
``down_blocks.0.resnets.1.conv1.spatial_conv.weight``. The family only supplies

* ``torch_ndim(torch_key, flax_shape)``: the rank of the PyTorch tensor (a Conv3d with a ``(1, 3, 3)``
  kernel is a 2-D conv in Flax, a 1x1x1 Conv3d is a Dense layer; both are rank 5 in PyTorch), and
* optionally ``canonical_key(torch_key)``: renames of older spellings of the same tensor.

Layout rule (one, for every weight): a PyTorch ``(O, I, *k)`` kernel is the Flax ``(*k, I, O)`` kernel, with
kernel dimensions of size 1 that the Flax layer does not have dropped (and re-inserted on export); a Linear
``(O, I)`` is the Flax ``(I, O)``; vectors and scalars are unchanged. The table is built from the (abstract)
model itself, so every variable of the model is accounted for: loading fails, naming the key, on any
missing, unexpected or mis-shaped entry.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from m3ddm_jax.errors import CheckpointError

Path = tuple  # a Flax variable path, e.g. ('conv_in', 'kernel')

# Flax leaf name -> PyTorch leaf name.
_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}
# PyTorch integer buffers (stored int64 in PyTorch, int32 in JAX without x64).
_INT_LEAVES = ("num_batches_tracked",)


def path_to_str(path: Path) -> str:
    return ".".join(str(p) for p in path)


def str_to_path(key: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def torch_key_of(path: Path) -> str:
    leaf = path[-1]
    if leaf not in _LEAF_TO_TORCH:
        raise ValueError(f"no PyTorch name for Flax variable {path_to_str(path)}")
    return path_to_str(path[:-1] + (_LEAF_TO_TORCH[leaf],))


def torch_shape_of(flax_shape: tuple, torch_ndim: int) -> tuple:
    """The PyTorch shape of a Flax variable of ``flax_shape`` that has rank ``torch_ndim`` in PyTorch."""
    if len(flax_shape) <= 1:
        if torch_ndim != len(flax_shape):
            raise ValueError(f"rank {torch_ndim} for a Flax vector of shape {flax_shape}")
        return tuple(flax_shape)
    *spatial, i, o = flax_shape
    n_sp = torch_ndim - 2
    if n_sp < len(spatial):
        raise ValueError(f"rank {torch_ndim} too small for a Flax kernel of shape {flax_shape}")
    return (o, i, *([1] * (n_sp - len(spatial))), *spatial)


def torch_to_flax_array(arr: np.ndarray, flax_shape: tuple) -> np.ndarray:
    """PyTorch ``(O, I, *k)`` -> Flax ``(*k', I, O)`` where ``k'`` is ``k`` without the size-1 dims Flax lacks."""
    if arr.ndim <= 1:
        return arr.reshape(flax_shape)
    moved = np.transpose(arr, (*range(2, arr.ndim), 1, 0))
    return moved.reshape(flax_shape)


def flax_to_torch_array(arr: np.ndarray, torch_shape: tuple) -> np.ndarray:
    """Inverse of :func:`torch_to_flax_array`."""
    if len(torch_shape) <= 1:
        return arr.reshape(torch_shape)
    o, i, *spatial = torch_shape
    nd = len(torch_shape)
    expanded = arr.reshape(*spatial, i, o)
    return np.ascontiguousarray(np.transpose(expanded, (nd - 1, nd - 2, *range(nd - 2))))


@dataclasses.dataclass(frozen=True)
class Entry:
    flax_path: Path
    torch_key: str
    flax_shape: tuple
    torch_shape: tuple
    is_int: bool


def _format_keys(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


class KeyTable:
    """The one-to-one map between a model's Flax variables and its PyTorch state-dict entries."""

    def __init__(
        self,
        entries: Iterable[Entry],
        canonical_key: Callable[[str], str] | None = None,
        name: str = "model",
    ):
        self.entries: list[Entry] = list(entries)
        self.by_torch: dict[str, Entry] = {e.torch_key: e for e in self.entries}
        if len(self.by_torch) != len(self.entries):
            raise ValueError("two Flax variables map to the same PyTorch key")
        self.canonical_key = canonical_key or (lambda k: k)
        self.name = name

    @classmethod
    def from_state(
        cls,
        state: nnx.State,
        torch_ndim: Callable[[str, tuple], int],
        canonical_key: Callable[[str], str] | None = None,
        name: str = "model",
    ) -> "KeyTable":
        entries = []
        for path, var in nnx.to_flat_state(state):
            value = var.get_value() if hasattr(var, "get_value") else var.value
            shape = tuple(value.shape)
            tkey = torch_key_of(path)
            is_int = path[-1] in _INT_LEAVES
            entries.append(Entry(path, tkey, shape, torch_shape_of(shape, torch_ndim(tkey, shape)), is_int))
        return cls(entries, canonical_key, name)

    def __len__(self) -> int:
        return len(self.entries)

    def torch_shapes(self) -> dict[str, tuple]:
        return {e.torch_key: e.torch_shape for e in self.entries}

    # -- PyTorch -> Flax ---------------------------------------------------------------------------
    def to_flax(self, state_dict: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict[Path, np.ndarray]:
        """Map a PyTorch state dict to ``{flax_path: array}``; every key must match, or CheckpointError."""
        canon: dict[str, np.ndarray] = {}
        for key, arr in state_dict.items():
            ck = self.canonical_key(key)
            if ck in canon:
                raise CheckpointError(f"{source}: key {key!r} duplicates {ck!r}")
            canon[ck] = arr
        unexpected = set(canon) - set(self.by_torch)
        missing = set(self.by_torch) - set(canon)
        if missing:
            raise CheckpointError(
                f"{source} does not fit the {self.name}: missing key(s) {_format_keys(missing)}"
                + (f"; unexpected key(s) {_format_keys(unexpected)}" if unexpected else "")
            )
        if unexpected:
            raise CheckpointError(f"{source} does not fit the {self.name}: unexpected key(s) {_format_keys(unexpected)}")
        out: dict[Path, np.ndarray] = {}
        for e in self.entries:
            arr = np.asarray(canon[e.torch_key])
            shape = tuple(arr.shape)
            if e.is_int and shape == (1,):  # some exporters store the counter as shape (1,)
                arr = arr.reshape(())
                shape = ()
            if shape != e.torch_shape:
                # Older VAE files store 1x1 attention projections as conv kernels (O, I, 1, 1).
                if arr.ndim > len(e.torch_shape) and tuple(s for s in shape if s != 1) == tuple(
                    s for s in e.torch_shape if s != 1
                ) and shape[: len(e.torch_shape)] == e.torch_shape:
                    arr = arr.reshape(e.torch_shape)
                else:
                    raise CheckpointError(
                        f"{source}: key {e.torch_key!r} has shape {list(shape)}, the {self.name} needs {list(e.torch_shape)}"
                    )
            if e.is_int:
                out[e.flax_path] = arr.astype(np.int32)
            else:
                if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
                    raise CheckpointError(f"{source}: key {e.torch_key!r} has dtype {arr.dtype}, expected a float type")
                out[e.flax_path] = torch_to_flax_array(arr, e.flax_shape)
        return out

    # -- Flax -> PyTorch ---------------------------------------------------------------------------
    def to_torch(self, flat: Mapping[Path, np.ndarray], dtype=None) -> "OrderedDict[str, np.ndarray]":
        """Map ``{flax_path: array}`` to a PyTorch state dict (floats cast to ``dtype`` if given)."""
        missing = [path_to_str(e.flax_path) for e in self.entries if e.flax_path not in flat]
        if missing:
            raise CheckpointError(f"Flax weights lack variable(s) {_format_keys(missing)} of the {self.name}")
        extra = set(flat) - {e.flax_path for e in self.entries}
        if extra:
            raise CheckpointError(
                f"Flax weights hold variable(s) the {self.name} does not have: {_format_keys(path_to_str(p) for p in extra)}"
            )
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for e in self.entries:
            arr = np.asarray(flat[e.flax_path])
            if tuple(arr.shape) != e.flax_shape:
                raise CheckpointError(
                    f"Flax variable {path_to_str(e.flax_path)} has shape {list(arr.shape)}, expected {list(e.flax_shape)}"
                )
            if e.is_int:
                out[e.torch_key] = arr.astype(np.int64).reshape(e.torch_shape)
            else:
                if dtype is not None:
                    arr = arr.astype(dtype)
                out[e.torch_key] = flax_to_torch_array(arr, e.torch_shape)
        return out


# -- NNX state helpers ------------------------------------------------------------------------------

def flat_arrays(state: nnx.State) -> dict[Path, np.ndarray]:
    """``{path: numpy array}`` of a concrete NNX state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out[path] = np.asarray(value)
    return out


def state_from_flat(abstract_state: nnx.State, flat: Mapping[Path, np.ndarray], dtype=None) -> nnx.State:
    """Fill an abstract NNX state with arrays (floats cast to ``dtype`` if given; ints kept)."""
    import jax.numpy as jnp  # noqa: PLC0415

    leaves = []
    for path, var in nnx.to_flat_state(abstract_state):
        if path not in flat:
            raise CheckpointError(f"weights lack variable {path_to_str(path)}")
        arr = flat[path]
        ref = var.get_value() if hasattr(var, "get_value") else var.value
        if tuple(arr.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"variable {path_to_str(path)} has shape {list(arr.shape)}, the model needs {list(ref.shape)}"
            )
        if dtype is not None and jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(dtype)
        leaves.append((path, var.replace(jnp.asarray(arr))))
    extra = set(flat) - {p for p, _ in leaves}
    if extra:
        raise CheckpointError(f"weights hold unknown variable(s) {_format_keys(path_to_str(p) for p in extra)}")
    return nnx.from_flat_state(leaves)
