"""Training logs: TensorBoard event files (``tensorboardX``, no TensorFlow), ``metrics.jsonl`` and a progress
line. Only process 0 writes; the others get a writer that does nothing.

``metrics.jsonl`` holds one JSON object per line and per logged step. A resumed run first calls
:meth:`MetricWriter.rewind` with the step it continues from: rows for later steps (logged by a run that was
killed or stopped before its next checkpoint, and about to be logged again) and a line cut short by a kill are
moved to ``metrics.superseded.jsonl``, so that ``metrics.jsonl`` of a run interrupted any number of times reads
like that of a run never interrupted.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("m3ddm_jax.train")


class MetricWriter:
    superseded_name = "metrics.superseded.jsonl"

    def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        self.jsonl = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                log.warning("tensorboardX is not installed: TensorBoard logs disabled (pip install tensorboardX)")

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, int(step))

    def rewind(self, step: int | None) -> int:
        """Keep the rows of steps ``<= step`` (``None``: none, a run starting from scratch); move the others and
        any incomplete line to :attr:`superseded_name`. ``metrics.jsonl`` is replaced atomically. Returns the
        number of lines moved."""
        if not self.enabled or not self.path.exists():
            return 0
        keep, moved = [], []
        with open(self.path, "rb") as f:
            for raw in f:
                row = None
                if raw.endswith(b"\n"):
                    try:
                        row = json.loads(raw)
                    except ValueError:
                        row = None
                ok = isinstance(row, dict) and step is not None and int(row.get("step", 1 << 62)) <= step
                (keep if ok else moved).append(raw if raw.endswith(b"\n") else raw + b"\n")
        if not moved:
            return 0
        with open(self.path.with_name(self.superseded_name), "ab") as f:
            f.writelines(moved)
            f.flush()
            os.fsync(f.fileno())
        self.jsonl.close()
        tmp = self.path.with_name(f".metrics.jsonl.{os.getpid()}.{time.time_ns()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the user's umask applies
        try:
            with os.fdopen(fd, "wb") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self.jsonl = open(self.path, "a", buffering=1)
        return len(moved)

    def text(self, step: int, tag: str, value: str) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, value, int(step))

    def flush(self) -> None:
        if self.enabled and self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()
        self.enabled = False
