#!/usr/bin/env python
"""Reproduce the M3DDM+ paper's DAVIS / DAVIS Static table (MSE, PSNR, SSIM, LPIPS, FVD, BMSE).

    python eval.py --config configs/eval_davis.py --config.data.dir=/data/DAVIS [--config.weights=W]
                   [--config.compare=W2] [--config.protocol=clean] [--config.output_dir=DIR]
    python eval.py --config.data.dir=MY_VIDEOS          # a folder of your own videos: every video is scored
    python eval.py --config.data.dir=/data/DAVIS --print_config   # every field and its value, then exit

For every sequence x dataset (DAVIS, DAVIS Static) x mask ratio (0.25, 0.66) x model: the ground truth is
resized and centre-cropped to the target box (256x144 for 16:9), its centre is kept (192x144 / 88x144),
the model outpaints it back to the box, and the metrics of :mod:`m3ddm_jax.metrics` compare the result
with the ground truth under the chosen protocol (``reference`` = the M3DDM+ evaluation as it runs,
``clean`` = its faults fixed; see :mod:`m3ddm_jax.metrics.protocol`).

Sequences (``data.sequences``, default ``auto``): the paper's 50 DAVIS-2016 sequences for a DAVIS source
(a DAVIS folder or TFDS), every video for a folder of videos; or ``all``, a named list, or names.

Output folder (``output_dir``; default ``runs/eval/<dataset>`` under the current folder, e.g. ``runs/eval/DAVIS``
or ``runs/eval/<your video folder's name>``; ``runs/`` is git-ignored in this checkout): ``per_video.jsonl`` (one
row per video, rewritten atomically after each video), ``timings.jsonl`` (seconds per video, kept apart so that
the tables do not depend on how the run went), ``per_video.csv`` (fixed columns, table order), ``summary.md``
(the paper's layout) and ``summary.json``, ``features/`` (I3D clip embeddings, so FVD over the whole set
survives a resume), ``videos/<signature>/<model>/<dataset>_<ratio>/<sequence>.mp4`` with ``save_videos``
(``<sequence>.lossless.mp4`` with ``lossless_videos``: lossless RGB copies of the model's output that re-score
to the same numbers), ``.digests.json`` (cached content hashes of the weight files).

Resume: a rerun skips every video already scored with the same settings signature (protocol, sampler
settings, data.fps, metric weight files by content) and the same model (U-Net and VAE files by content), and
scores anew whatever changed. A run killed at any moment, rerun, writes the same tables as an uninterrupted
run. Bad input gives one line on stderr and exit code 1; a video that fails to load is one line, the others
are scored, and the exit code is 1 (the table waits until a rerun has every row).

Several processes (a TPU pod slice, a multi-GPU box with one process per GPU, several machines):

    python eval.py --multihost ...                 # every host of a TPU pod slice / SLURM / MPI job (auto-detected)
    python eval.py --multihost --coordinator=HOST:PORT --num_processes=N --process_id=I ...   # anywhere else

The (sequence, dataset) units are split over the processes, each writes its own rows, and process 0 writes the
table once all are done. The loop itself lives in :mod:`m3ddm_jax.evaluation`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from m3ddm_jax.cli_common import (CONFIG_ERRORS, absl_flags_parser, checked_config, config_error_message,  # noqa: E402
                                  print_config)
from m3ddm_jax.errors import ConfigError, UserError  # noqa: E402
from m3ddm_jax.runtime import tune_malloc  # noqa: E402

tune_malloc()  # m3ddm_jax/runtime.py

PROG = "eval.py"
REPO = Path(__file__).resolve().parent
_CONFIG = None  # the --config flag, defined when run as a script (so importing this file defines no flags)
_PRINT_CONFIG = None
_FLAGS: dict = {}  # the run flags (multi-host, videos per call), defined with --config


def main(argv) -> None:
    from absl import logging  # noqa: PLC0415

    logging.set_verbosity(logging.WARNING)  # no INFO chatter from JAX's backend probing
    if len(argv) > 1:
        print(f"{PROG}: error: unexpected arguments {' '.join(argv[1:])} (options are --config.FIELD=VALUE)", file=sys.stderr)
        sys.exit(1)
    try:
        cfg = checked_config(_CONFIG.value)  # a config file that failed to load reports here
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    if _PRINT_CONFIG.value:
        from absl import flags  # noqa: PLC0415

        print_config(cfg, flags.FLAGS["config"].config_filename)
        sys.exit(0)
    try:
        code = run(cfg)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (finished videos are kept; rerun to resume)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def run(cfg) -> int:
    """Start ``jax.distributed`` when asked, then :func:`m3ddm_jax.evaluation.evaluate`."""
    from m3ddm_jax.evaluation import evaluate  # noqa: PLC0415

    f = {k: v.value for k, v in _FLAGS.items()}
    if f["videos_per_call"] < 1:
        raise UserError(f"--videos_per_call must be at least 1, got {f['videos_per_call']}")
    index, count, barrier = 0, 1, None
    if f["multihost"]:
        from m3ddm_jax.runtime import barrier, init_distributed  # noqa: PLC0415

        index, count = init_distributed(f["coordinator"], f["num_processes"], f["process_id"])
    elif any(f[k] is not None for k in ("coordinator", "num_processes", "process_id")):
        raise UserError("--coordinator, --num_processes and --process_id need --multihost")
    return evaluate(cfg, videos_per_call=f["videos_per_call"], process_index=index, process_count=count,
                    barrier=barrier, prog=PROG)


def define_flags() -> None:
    global _CONFIG, _PRINT_CONFIG
    from absl import flags  # noqa: PLC0415

    from m3ddm_jax.outpaint.batch import DEFAULT_VIDEOS_PER_CALL  # noqa: PLC0415

    _PRINT_CONFIG = flags.DEFINE_bool("print_config", False,
                                      "print the config's fields and values (after --config.* overrides) and exit")
    _FLAGS["videos_per_call"] = flags.DEFINE_integer(
        "videos_per_call", DEFAULT_VIDEOS_PER_CALL,
        "videos of one model outpainted together per call (their windows batched together)")
    _FLAGS["multihost"] = flags.DEFINE_bool(
        "multihost", False, "one of several processes (jax.distributed): TPU pod slice, several GPU processes or hosts")
    _FLAGS["coordinator"] = flags.DEFINE_string(
        "coordinator", None, "with --multihost: HOST:PORT of process 0 (auto-detected on TPU pods / SLURM / MPI; "
        "or JAX_COORDINATOR_ADDRESS)")
    _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None,
                                                   "with --multihost: number of processes (or JAX_NUM_PROCESSES)")
    _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None,
                                                "with --multihost: this process's index, 0..N-1 (or JAX_PROCESS_ID)")
    try:  # config_flags reads the file and applies --config.* overrides right here
        _CONFIG = config_flags.DEFINE_config_file("config", str(REPO / "configs" / "eval_davis.py"),
                                                  "evaluation config file (ml_collections)", lock_config=True)
    except CONFIG_ERRORS as e:
        print(f"{PROG}: error: {config_error_message(e, sys.argv)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=absl_flags_parser(PROG))
