"""Device mesh and shardings for training.

* The mesh has named axes (``config.mesh.axes``, at least ``data`` and ``fsdp``) sized from
  ``config.mesh.shape`` (one size may be ``-1``: the remaining devices). All axes are ``Auto`` (jax 0.10's
  ``jax.make_mesh`` defaults to ``Explicit`` axes, which the NNX convolutions do not support).
* Logical axis rules (``config.sharding.rules``) map the two logical names this trainer uses to mesh axes:
  ``batch`` (the leading axis of every input) and ``shard`` (the chosen axis of a parameter). The defaults
  put the batch over ``data`` and ``fsdp`` and the parameters over ``fsdp``.
* A parameter (and its optimizer moments / EMA copy, which have the same shape) is sharded on its largest
  dimension divisible by the size of the ``shard`` axes (ties: the last such dimension); it is replicated if
  no dimension divides or it has fewer than ``min_shard_elements`` elements. Scalars and BatchNorm statistics
  are replicated.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m3ddm_jax.errors import ConfigError

DEFAULT_RULES = (("batch", ("data", "fsdp")), ("shard", ("fsdp",)))


def make_mesh(shape: Mapping[str, int] | Sequence[tuple[str, int]], axes: Sequence[str] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default all) with ``shape`` ``{axis: size}``; one size may be -1."""
    items = list(shape.items()) if isinstance(shape, Mapping) else [tuple(x) for x in shape]
    if axes is not None:
        d = dict(items)
        missing = [a for a in axes if a not in d]
        if missing:
            raise ConfigError(f"mesh.shape lacks the axes {missing}")
        items = [(a, int(d[a])) for a in axes]
    names = tuple(a for a, _ in items)
    sizes = [int(s) for _, s in items]
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ConfigError("mesh.shape: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or n % known:
            raise ConfigError(f"mesh.shape {dict(items)} does not divide {n} devices")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ConfigError(f"mesh.shape {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, have {n}")
    try:
        from jax.experimental import mesh_utils  # noqa: PLC0415

        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # non-TPU topologies or a device subset: plain reshape
        arr = np.array(devices, dtype=object).reshape(sizes)
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return Mesh(arr, names, axis_types=auto)


def resolve_rules(rules, mesh: Mesh) -> dict[str, tuple[str, ...]]:
    """``{logical name: mesh axes}`` from ``[(name, axis | [axes] | None), ...]``; unknown mesh axes raise."""
    out = {}
    for name, axes in (rules or DEFAULT_RULES):
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        axes = tuple(axes)
        for a in axes:
            if a not in mesh.axis_names:
                raise ConfigError(f"sharding rule {name!r} names mesh axis {a!r}; the mesh has {mesh.axis_names}")
        out[str(name)] = axes
    for need in ("batch", "shard"):
        out.setdefault(need, ())
    return out


def axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(axes: tuple[str, ...]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def param_spec(shape: Sequence[int], shard_axes: tuple[str, ...], shard_size: int, min_elements: int = 0) -> P:
    """PartitionSpec of one parameter: its largest dimension divisible by ``shard_size``, else replicated."""
    if shard_size <= 1 or not shape or math.prod(shape) < max(min_elements, 1):
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % shard_size == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = _spec_entry(shard_axes)
    return P(*spec)


class Shardings:
    """The shardings of one training run (mesh + rules)."""

    def __init__(self, mesh: Mesh, rules=None, min_shard_elements: int = 0):
        self.mesh = mesh
        self.rules = resolve_rules(rules, mesh)
        self.batch_axes = self.rules["batch"]
        self.shard_axes = self.rules["shard"]
        self.shard_size = axes_size(mesh, self.shard_axes)
        self.batch_size_divisor = axes_size(mesh, self.batch_axes)
        self.min_shard_elements = int(min_shard_elements)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def for_param(self, x) -> NamedSharding:
        return NamedSharding(self.mesh, param_spec(tuple(x.shape), self.shard_axes, self.shard_size,
                                                   self.min_shard_elements))

    def params_tree(self, tree) -> Any:
        return jax.tree.map(self.for_param, tree)

    def replicated_tree(self, tree) -> Any:
        return jax.tree.map(lambda _: self.replicated, tree)

    def for_batch(self, x) -> NamedSharding:
        ndim = len(x.shape)
        return NamedSharding(self.mesh, P(_spec_entry(self.batch_axes), *([None] * (ndim - 1))))

    def batch_tree(self, tree) -> Any:
        return jax.tree.map(self.for_batch, tree)


def describe_shardings(params, shardings_tree) -> dict[str, int]:
    """Counts for logs/tests: how many parameters (and elements) are sharded vs replicated."""
    n_sh = n_rep = e_sh = e_rep = 0
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings_tree, is_leaf=lambda v: isinstance(v, NamedSharding))):
        size = math.prod(x.shape)
        if any(a is not None for a in s.spec):
            n_sh, e_sh = n_sh + 1, e_sh + size
        else:
            n_rep, e_rep = n_rep + 1, e_rep + size
    return {"sharded": n_sh, "replicated": n_rep, "sharded_elements": e_sh, "replicated_elements": e_rep}


def host_batch_to_global(batch: Mapping[str, np.ndarray], shardings: Shardings) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> global ``jax.Array``s sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(shardings.for_batch(v), np.asarray(v))
            for k, v in batch.items()}
