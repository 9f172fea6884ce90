"""Training checkpoints with orbax: model, optimizer state, step, PRNG state and the data iterator together.

``WORKDIR/checkpoints/<step>/`` holds three items: ``state`` (the train-state pytree: parameters, BatchNorm
statistics, optimizer state, EMA, step, PRNG key data), ``data`` (the grain iterator state, JSON) and
``meta`` (step, counters of skipped videos, the config name, and a checksum of every state array). Saving is
asynchronous; the newest ``keep`` checkpoints are kept. Restoring takes the abstract state *with the current
run's shardings*, so a checkpoint written on one mesh shape restores onto another (orbax reshards).

Faults: orbax writes a step into a temporary folder and renames it when complete, so a process killed during
an (asynchronous) save leaves no half-written step behind; its temporary folder is removed at the next start.
A step that is there but unreadable (a truncated or damaged file: orbax's error, or a state array whose
checksum differs from the one recorded at save time, which catches damage orbax would restore silently) is
moved aside to ``<step>.corrupt`` with a warning, and the restore falls back to the next older step. Only when
no step is readable does restoring fail (one line): a run never silently starts again from scratch.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from m3ddm_jax.errors import CheckpointError

log = logging.getLogger("m3ddm_jax.train")

CORRUPT_SUFFIX = ".corrupt"


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                            enable_async_checkpointing=bool(async_save),
                                            cleanup_tmp_directories=True)  # left by a save that was killed
        # every item with its handler: restores and metadata reads need no guessing (and print no warnings)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: bytes | None, meta: dict, force: bool = True) -> bool:
        state = _without_none(state)
        meta = dict(meta, checksums=state_checksums(state))
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(json.loads(data_state.decode()))
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, bytes | None, dict]:
        """``(state, data iterator state or None, meta)`` of ``step``, or of the newest readable step: an
        unreadable newest step is moved aside (``<step>.corrupt``) with a warning and the next older one is
        tried. A :class:`CheckpointError` (one line) only when an explicit ``step`` or every step fails."""
        if step is not None:
            return self._restore_step(abstract_state, int(step))
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        errors: list[tuple[int, CheckpointError]] = []
        for s in reversed(steps):
            try:
                out = self._restore_step(abstract_state, s)
            except CheckpointError as e:
                errors.append((s, e))
                continue
            for bad, e in errors:  # only once an older step restored: never leave a run with nothing
                moved = self._set_aside(bad)
                log.warning("%s; %s; resuming from step %d instead", e,
                            f"moved aside to {moved.name}" if moved else "left in place", s)
            return out
        raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps "
                              f"{', '.join(map(str, reversed(steps)))}; newest: {errors[0][1]})")

    def _restore_step(self, abstract_state: dict, step: int) -> tuple[dict, bytes | None, dict]:
        where = self.directory / str(step)
        try:
            names = set(self.manager.item_metadata(step).keys())  # the items saved (JSON ones have no metadata)
            items = {"state": ocp.args.StandardRestore(_without_none(abstract_state)),
                     "meta": ocp.args.JsonRestore()}
            if "data" in names:
                items["data"] = ocp.args.JsonRestore()
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
            meta = dict(out["meta"])
        except Exception as e:  # noqa: BLE001 - truncated / damaged / incompatible checkpoint: one line
            raise CheckpointError(f"cannot restore checkpoint {where}: {_one_line(e)}") from e
        restored = _without_none(out["state"])
        if "checksums" in meta:  # older checkpoints carry none
            bad = _checksum_mismatch(meta["checksums"], state_checksums(restored))
            if bad:
                raise CheckpointError(f"cannot restore checkpoint {where}: {bad}")
        state = _with_none(restored, abstract_state)
        data = out.get("data") if "data" in items else None
        return state, (json.dumps(data).encode() if data is not None else None), meta

    def _set_aside(self, step: int) -> Path | None:
        """Rename an unreadable step folder to ``<step>.corrupt`` (``.corrupt.N`` if taken) so that the step can
        be saved again; orbax ignores the new name. Process 0 renames; every process then rereads the list."""
        src = self.directory / str(step)
        dst = None
        if jax.process_index() == 0 and src.is_dir():
            dst = self.directory / f"{step}{CORRUPT_SUFFIX}"
            n = 1
            while dst.exists():
                dst = self.directory / f"{step}{CORRUPT_SUFFIX}.{n}"
                n += 1
            try:
                src.rename(dst)
            except OSError as e:
                log.warning("cannot move the unreadable checkpoint %s aside: %s", src, e)
                dst = None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"m3ddm_checkpoint_set_aside_{step}")
        self.manager.reload()
        return dst

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# -- checksums ----------------------------------------------------------------------------------------------

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_GOLDEN = np.uint32(0x9E3779B1)  # odd: position weights are a bijection of the flat index mod 2**32


def _leaf_sums(x: jax.Array) -> jax.Array:
    """``(2,)`` uint32: the sum of the array's bit patterns and their position-weighted sum (mod 2**32). Any
    change to one element changes the first; reordering changes the second. Integer sums are exact, so the
    result does not depend on sharding or reduction order. No reshape: sharded arrays stay sharded."""
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
    else:
        u = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    flat = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(u.ndim)):
        flat = flat + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
        stride *= u.shape[d]
    weight = flat * _GOLDEN + jnp.uint32(1)
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weight, dtype=jnp.uint32)])


@jax.jit
def _tree_sums(tree):
    return jax.tree.map(_leaf_sums, tree)


def state_checksums(state: dict) -> dict[str, list[int]]:
    """``{"params/conv_in/kernel": [sum, weighted sum], ...}`` for every array of ``state`` (computed where
    the arrays live; only the small results come to the host)."""
    arrays = {k: v for k, v in state.items() if v is not None}
    out = {}
    for path, value in jax.tree_util.tree_leaves_with_path(_tree_sums(arrays)):
        # a full reduction is replicated: every process holds the whole (2,) result
        host = np.asarray(value if value.is_fully_addressable else value.addressable_data(0))
        out["/".join(_key_name(k) for k in path)] = [int(v) for v in host.reshape(-1)]
    return out


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _checksum_mismatch(saved: dict, now: dict) -> str:
    missing = sorted(set(saved) ^ set(now))
    if missing:
        return f"its arrays differ from those saved ({missing[0]})"
    bad = [k for k in sorted(saved) if list(saved[k]) != list(now[k])]
    if bad:
        return f"checksum mismatch in {len(bad)} array(s) ({bad[0]}): damaged data"
    return ""


# -- helpers --------------------------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _without_none(state: dict) -> dict:
    return {k: v for k, v in state.items() if v is not None}


def _with_none(restored: dict, like: dict) -> dict:
    return {k: (restored.get(k) if like.get(k) is not None else None) for k in like}


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
