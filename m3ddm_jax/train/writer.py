"""Training logs: TensorBoard event files (``tensorboardX``, no TensorFlow), ``metrics.jsonl`` and a progress
line. Only process 0 writes; the others get a writer that does nothing."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("m3ddm_jax.train")


class MetricWriter:
    def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
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
