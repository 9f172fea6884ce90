"""Process-level tuning for CPU runs.

XLA on CPU allocates its large temporary buffers fresh on every execution; with glibc's defaults each one is
an ``mmap`` whose pages fault in one by one and are returned on free, which on small VMs costs more time
than the arithmetic (measured: a mid-size U-Net step 92 s -> 44.5 s, the tiny model spent 70% of its time
in the kernel). :func:`tune_malloc` asks glibc to serve large blocks from the heap and keep freed memory
(``mallopt``: no mmap threshold use, huge trim threshold, one arena): the same effect as the environment
variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... MALLOC_ARENA_MAX=1``, applied from inside the
process. It is a no-op off glibc. The entry scripts and the test suite call it at start-up.

:func:`init_distributed` / :func:`barrier`: ``--multihost`` runs of ``eval.py`` and ``infer.py`` (several
processes, ``jax.distributed``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_done = False


def tune_malloc() -> bool:
    """Apply the glibc settings once; returns True when they were applied."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))
    _done = ok
    return ok


# -- several processes (jax.distributed) ------------------------------------------------------------------------

def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> tuple[int, int]:
    """``jax.distributed.initialize`` for ``--multihost`` runs; returns ``(process index, process count)``.

    On a Cloud TPU pod slice, under SLURM or Open MPI the arguments are found automatically (give none). Elsewhere
    (several GPU processes on one box, CPU processes on localhost) give all three, or set ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Must run before any other JAX call.
    A failure to start is a one-line :class:`~m3ddm_jax.errors.UserError`."""
    import os  # noqa: PLC0415

    import jax  # noqa: PLC0415

    from m3ddm_jax.errors import UserError  # noqa: PLC0415

    def env_int(name: str, value: int | None) -> int | None:
        if value is not None or not os.environ.get(name, "").strip():
            return value
        try:
            return int(os.environ[name])
        except ValueError:
            raise UserError(f"{name} must be an integer, got {os.environ[name]!r}") from None

    kw = {"coordinator_address": coordinator or None, "num_processes": env_int("JAX_NUM_PROCESSES", num_processes),
          "process_id": env_int("JAX_PROCESS_ID", process_id)}
    try:
        jax.distributed.initialize(**{k: v for k, v in kw.items() if v is not None})
    except (ValueError, TypeError, RuntimeError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--multihost: jax.distributed did not start ({line}); on a machine that is not a TPU pod "
                        "slice or a SLURM/MPI job give the coordinator address, the number of processes and this "
                        "process's id") from e
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Block until every process of a ``jax.distributed`` run reached ``barrier(name)`` (no-op for one process)."""
    import jax  # noqa: PLC0415

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)
