"""Training checkpoints with orbax: model, optimizer state, step, PRNG state and the data iterator together.

``WORKDIR/checkpoints/<step>/`` holds three items: ``state`` (the train-state pytree: parameters, BatchNorm
statistics, optimizer state, EMA, step, PRNG key data), ``data`` (the grain iterator state, JSON) and
``meta`` (step, counters of skipped videos, the config name). Saving is asynchronous; the newest ``keep``
checkpoints are kept. Restoring takes the abstract state *with the current run's shardings*, so a checkpoint
written on one mesh shape restores onto another (orbax reshards).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from m3ddm_jax.errors import CheckpointError


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                            enable_async_checkpointing=bool(async_save))
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: bytes | None, meta: dict, force: bool = True) -> bool:
        items = {"state": ocp.args.StandardSave(_without_none(state)), "meta": ocp.args.JsonSave(meta)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(json.loads(data_state.decode()))
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, bytes | None, dict]:
        """``(state, data iterator state or None, meta)`` of ``step`` (default: latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        names = set(self.manager.item_metadata(step).keys()) if hasattr(self.manager, "item_metadata") else set()
        items = {"state": ocp.args.StandardRestore(_without_none(abstract_state)), "meta": ocp.args.JsonRestore()}
        if not names or "data" in names:
            items["data"] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - corrupt / incompatible checkpoint: one line
            raise CheckpointError(f"cannot restore checkpoint {self.directory / str(step)}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from e
        state = _with_none(out["state"], abstract_state)
        data = out.get("data") if "data" in items else None
        return state, (json.dumps(data).encode() if data is not None else None), dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _without_none(state: dict) -> dict:
    return {k: v for k, v in state.items() if v is not None}


def _with_none(restored: dict, like: dict) -> dict:
    return {k: (restored.get(k) if like.get(k) is not None else None) for k in like}


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
