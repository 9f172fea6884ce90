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
from collections.abc import Mapping
from typing import Callable, Iterable

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
        lazy = self.to_flax_lazy(state_dict, source)
        return {p: lazy[p] for p in lazy}

    def to_flax_lazy(self, state_dict: Mapping[str, np.ndarray], source: str = "checkpoint") -> "LazyFlat":
        """:meth:`to_flax` without reading anything: keys, shapes and dtypes are checked now (from the file
        header when ``state_dict`` is a :class:`~m3ddm_jax.interop.tensor_files.TensorSource`), each tensor is
        read and converted when the returned mapping is indexed."""
        from m3ddm_jax.interop.tensor_files import as_source  # noqa: PLC0415

        src = as_source(state_dict)
        canon: dict[str, str] = {}
        for key in src:
            ck = self.canonical_key(key)
            if ck in canon:
                raise CheckpointError(f"{source}: key {key!r} duplicates {ck!r}")
            canon[ck] = key
        unexpected = set(canon) - set(self.by_torch)
        missing = set(self.by_torch) - set(canon)
        if missing:
            raise CheckpointError(
                f"{source} does not fit the {self.name}: missing key(s) {_format_keys(missing)}"
                + (f"; unexpected key(s) {_format_keys(unexpected)}" if unexpected else "")
            )
        if unexpected:
            raise CheckpointError(f"{source} does not fit the {self.name}: unexpected key(s) {_format_keys(unexpected)}")
        items: dict[Path, tuple[str, Callable]] = {}
        metas: dict[Path, tuple[tuple, np.dtype]] = {}
        for e in self.entries:
            key = canon[e.torch_key]
            shape, dtype = src.meta(key)
            shape, dtype = tuple(shape), np.dtype(dtype)
            reshape = None
            if e.is_int and shape == (1,):  # some exporters store the counter as shape (1,)
                reshape = shape = ()
            if shape != e.torch_shape:
                # Older VAE files store 1x1 attention projections as conv kernels (O, I, 1, 1).
                if len(shape) > len(e.torch_shape) and tuple(s for s in shape if s != 1) == tuple(
                    s for s in e.torch_shape if s != 1
                ) and shape[: len(e.torch_shape)] == e.torch_shape:
                    reshape = e.torch_shape
                else:
                    raise CheckpointError(
                        f"{source}: key {e.torch_key!r} has shape {list(shape)}, the {self.name} needs {list(e.torch_shape)}"
                    )
            if e.is_int:
                dtype = np.dtype(np.int32)
            elif not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
                raise CheckpointError(f"{source}: key {e.torch_key!r} has dtype {dtype}, expected a float type")
            items[e.flax_path] = (key, _Convert(reshape, e.is_int, e.flax_shape))
            metas[e.flax_path] = (e.flax_shape, dtype)
        return LazyFlat(src, items, metas)

    # -- Flax -> PyTorch ---------------------------------------------------------------------------
    def check(self, flat: Mapping[Path, np.ndarray]) -> None:
        """CheckpointError naming missing, extra or mis-shaped variables (shapes only: nothing is read)."""
        missing = [path_to_str(e.flax_path) for e in self.entries if e.flax_path not in flat]
        if missing:
            raise CheckpointError(f"Flax weights lack variable(s) {_format_keys(missing)} of the {self.name}")
        extra = set(flat) - {e.flax_path for e in self.entries}
        if extra:
            raise CheckpointError(
                f"Flax weights hold variable(s) the {self.name} does not have: {_format_keys(path_to_str(p) for p in extra)}"
            )
        for e in self.entries:
            shape = shape_of(flat, e.flax_path)
            if shape != e.flax_shape:
                raise CheckpointError(
                    f"Flax variable {path_to_str(e.flax_path)} has shape {list(shape)}, expected {list(e.flax_shape)}"
                )

    def to_torch(self, flat: Mapping[Path, np.ndarray], dtype=None) -> "OrderedDict[str, np.ndarray]":
        """Map ``{flax_path: array}`` to a PyTorch state dict (floats cast to ``dtype`` if given)."""
        lazy = self.to_torch_lazy(flat, dtype)
        return OrderedDict((k, lazy[k]) for k in lazy)

    def to_torch_lazy(self, flat: Mapping[Path, np.ndarray], dtype=None) -> "Mapped":
        """:meth:`to_torch` converting one tensor per lookup (checked now, read when indexed)."""
        self.check(flat)
        dtype = None if dtype is None else np.dtype(dtype)
        by_key = {e.torch_key: e for e in self.entries}

        def meta(key):
            e = by_key[key]
            if e.is_int:
                return e.torch_shape, np.dtype(np.int64)
            return e.torch_shape, dtype if dtype is not None else dtype_of(flat, e.flax_path)

        def get(key):
            e = by_key[key]
            arr = np.asarray(flat[e.flax_path])
            if e.is_int:
                return arr.astype(np.int64).reshape(e.torch_shape)
            if dtype is not None:
                arr = arr.astype(dtype)
            return flax_to_torch_array(arr, e.torch_shape)

        return Mapped(list(by_key), get, meta)


class Mapped(Mapping):
    """A read-only mapping computed on lookup: ``get(key)`` for the value, ``meta(key) -> (shape, dtype)``."""

    def __init__(self, keys: Iterable, get: Callable, meta: Callable):
        self._keys, self._get, self._meta = list(keys), get, meta
        self._set = set(self._keys)

    def meta(self, key):
        shape, dtype = self._meta(key)
        return tuple(shape), np.dtype(dtype)

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._set


def cast_floats(flat: Mapping, dtype) -> Mapping:
    """``flat`` with floating arrays cast to ``dtype`` on lookup (ints kept); ``dtype=None``: ``flat``."""
    if dtype is None:
        return flat
    dtype = np.dtype(dtype)

    def is_float(dt):
        return np.issubdtype(dt, np.floating) or dt.name == "bfloat16"

    def get(key):
        a = np.asarray(flat[key])
        return a.astype(dtype) if is_float(a.dtype) else a

    def meta(key):
        dt = dtype_of(flat, key)
        return shape_of(flat, key), dtype if is_float(dt) else dt

    return Mapped(list(flat), get, meta)


# -- NNX state helpers ------------------------------------------------------------------------------

def flat_arrays(state: nnx.State) -> dict[Path, np.ndarray]:
    """``{path: numpy array}`` of a concrete NNX state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out[path] = np.asarray(value)
    return out


class _Convert:
    """PyTorch layout -> Flax layout of one tensor (a view where possible)."""

    def __init__(self, reshape: tuple | None, is_int: bool, flax_shape: tuple):
        self.reshape, self.is_int, self.flax_shape = reshape, is_int, flax_shape

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        if self.reshape is not None:
            arr = arr.reshape(self.reshape)
        if self.is_int:
            return arr.astype(np.int32).reshape(self.flax_shape)
        return torch_to_flax_array(arr, self.flax_shape)


def _identity(arr: np.ndarray) -> np.ndarray:
    return arr


class LazyFlat(Mapping):
    """``{flax_path: array}`` over a tensor source: every lookup reads (and converts) the tensor anew, nothing
    is cached, so a model built from it (:func:`state_from_flat`) never holds a second host copy.

    ``meta(path)`` gives ``(shape, dtype)`` without reading; :meth:`load` reads one tensor through a reused
    scratch buffer into a fresh aligned array of the asked dtype (what :func:`state_from_flat` hands to the
    device)."""

    def __init__(self, source, items: Mapping[Path, tuple[str, Callable]], metas: Mapping[Path, tuple]):
        self.source, self._items, self._metas = source, dict(items), dict(metas)
        self._scratch: np.ndarray | None = None

    @classmethod
    def identity(cls, source, paths: Mapping[Path, str]) -> "LazyFlat":
        """Variables stored under their own names and layouts (a converted Flax file)."""
        return cls(source, {p: (k, _identity) for p, k in paths.items()},
                   {p: tuple(source.meta(k)) for p, k in paths.items()})

    def meta(self, path: Path) -> tuple[tuple, np.dtype]:
        shape, dtype = self._metas[path]
        return tuple(shape), np.dtype(dtype)

    def __getitem__(self, path: Path) -> np.ndarray:
        key, convert = self._items[path]
        return convert(self.source.read(key))

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path) -> bool:
        return path in self._items

    def load(self, path: Path, dtype=None) -> np.ndarray:
        """The variable as a new C-contiguous, 64-byte aligned array (cast to ``dtype`` if given)."""
        from m3ddm_jax.interop.tensor_files import aligned_empty  # noqa: PLC0415

        key, convert = self._items[path]
        need = self.source.nbytes(key) if getattr(self.source, "reads_into", False) else 0
        if need and (self._scratch is None or self._scratch.nbytes < need):
            biggest = max(self.source.nbytes(k) for k, _ in self._items.values())
            self._scratch = aligned_empty((biggest,), np.uint8)
        view = convert(self.source.read(key, self._scratch))
        out = aligned_empty(view.shape, view.dtype if dtype is None else dtype)
        np.copyto(out, view, casting="unsafe")
        return out

    def release(self) -> None:
        """Free the scratch buffer (the source stays readable)."""
        self._scratch = None


def shape_of(flat: Mapping, path) -> tuple:
    """``flat[path].shape`` without reading a lazy mapping."""
    from m3ddm_jax.interop.tensor_files import shape_of as _shape_of  # noqa: PLC0415

    return _shape_of(flat, path)


def dtype_of(flat: Mapping, path) -> np.dtype:
    from m3ddm_jax.interop.tensor_files import dtype_of as _dtype_of  # noqa: PLC0415

    return _dtype_of(flat, path)


def state_from_flat(abstract_state: nnx.State, flat: Mapping[Path, np.ndarray], dtype=None) -> nnx.State:
    """Fill an abstract NNX state with arrays (floats cast to ``dtype`` if given; ints kept).

    One variable at a time: each is read (from a :class:`LazyFlat`) or copied into a fresh 64-byte aligned
    array that ``jax.device_put`` adopts as the device buffer on CPU (on an accelerator it is copied over and
    freed), so the only copy of the weights that survives is the model's; ``flat`` itself is never modified
    or aliased."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from m3ddm_jax.interop.tensor_files import aligned_empty  # noqa: PLC0415

    flat_vars = list(nnx.to_flat_state(abstract_state))
    for path, var in flat_vars:  # everything checked before anything is read
        if path not in flat:
            raise CheckpointError(f"weights lack variable {path_to_str(path)}")
        ref = var.get_value() if hasattr(var, "get_value") else var.value
        shape = shape_of(flat, path)
        if shape != tuple(ref.shape):
            raise CheckpointError(
                f"variable {path_to_str(path)} has shape {list(shape)}, the model needs {list(ref.shape)}"
            )
    extra = set(flat) - {p for p, _ in flat_vars}
    if extra:
        raise CheckpointError(f"weights hold unknown variable(s) {_format_keys(path_to_str(p) for p in extra)}")
    want = None if dtype is None else jnp.dtype(dtype)
    leaves = []
    for path, var in flat_vars:
        src_dtype = dtype_of(flat, path)
        target = want if want is not None and jnp.issubdtype(src_dtype, jnp.floating) else src_dtype
        if isinstance(flat, LazyFlat):
            arr = flat.load(path, target)
        else:
            src = np.asarray(flat[path])
            arr = aligned_empty(src.shape, target)
            np.copyto(arr, src, casting="unsafe")
            del src
        leaves.append((path, var.replace(jax.device_put(arr))))
        del arr
    if isinstance(flat, LazyFlat):
        flat.release()
    return nnx.from_flat_state(leaves)
