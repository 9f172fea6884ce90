"""Fine-tune the M3DDM U-Net (M3DDM+ uniform masks, or M3DDM per-frame masks) on a folder of videos.

    python train.py --config configs/m3ddm_plus.py --config.data.dir=VIDEOS --workdir runs/plus
    python train.py --config configs/tiny.py --config.data.dir=VIDEOS --workdir /tmp/tiny   # CPU smoke run

Any config field can be overridden with ``--config.a.b=value``; ``--print_config`` prints every field with its
value (after the overrides) and exits. Re-running with the same ``--workdir``
resumes from the newest checkpoint (model, optimizer, step, PRNG and data position). ``--multihost`` calls
``jax.distributed.initialize()`` first (TPU pods, multi-node GPU); only process 0 writes logs.
Bad configuration or data: one line on stderr, exit code 1.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m3ddm_jax.cli_common import absl_flags_parser, checked_config, print_config, run_main  # noqa: E402
from m3ddm_jax.runtime import tune_malloc  # noqa: E402

tune_malloc()  # m3ddm_jax/runtime.py

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for checkpoints, logs, previews and the export")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (several hosts)")
_STOP_AT = flags.DEFINE_integer("stop_at", None, "stop (with a checkpoint) at this step; resume later")
_EXPORT_ONLY = flags.DEFINE_bool("export_only", False, "restore the newest checkpoint, export the U-Net, exit")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False,
                                  "print the config's fields and values (after --config.* overrides) and exit")


def _main(argv) -> int:
    del argv
    from m3ddm_jax.errors import ConfigError  # noqa: PLC0415

    def run() -> int:
        if _CONFIG.value is None:
            raise ConfigError("--config is required (e.g. configs/m3ddm_plus.py)")
        cfg = checked_config(_CONFIG.value)
        if _PRINT_CONFIG.value:
            print_config(cfg, flags.FLAGS["config"].config_filename)
            return 0
        if not _WORKDIR.value:
            raise ConfigError("--workdir is required")
        import jax  # noqa: PLC0415

        if _MULTIHOST.value:
            jax.distributed.initialize()
        from absl import logging as absl_logging  # noqa: PLC0415

        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/grain INFO chatter off; progress is printed
        from m3ddm_jax.train.trainer import Trainer  # noqa: PLC0415

        trainer = Trainer(_CONFIG.value, _WORKDIR.value)
        try:
            if _EXPORT_ONLY.value:
                trainer.export()
                return 0
            hist = trainer.run(stop_at=_STOP_AT.value)
        finally:
            trainer.close()
        if jax.process_index() == 0:
            last = f"{hist.losses[-1]:.5f}" if hist.losses else "n/a"
            print(f"done: step {trainer.step}, last loss {last}, skipped videos {hist.skipped}"
                  + (f" ({hist.stopped_by})" if hist.stopped_by else ""), flush=True)
        return 0

    return run_main("train.py", run)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(_main(argv)), flags_parser=absl_flags_parser("train.py"))
