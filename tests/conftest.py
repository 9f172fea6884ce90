"""Shared test set-up: the golden fixtures (in the repository), absl flag parsing for grain workers.

Golden data recorded from the PyTorch reference lives in ``tests/fixtures`` (see its README.md); the tiny
U-Net and VAE it was recorded with ship in the package (``m3ddm_jax/assets/tiny``). Nothing outside the
repository is read.
"""
from __future__ import annotations

import os
from pathlib import Path

# The suite is a CPU suite. With libtpu installed (extra tpu-aot, for the TPU-compiler tests) JAX would probe for
# a TPU in every process it starts, printing libtpu warnings to stderr (which the one-line-error tests read);
# the AOT tests reach the TPU compiler through jax.experimental.topologies, which works with this set.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from m3ddm_jax.runtime import tune_malloc

tune_malloc()  # see m3ddm_jax/runtime.py: XLA CPU buffers without mmap page-fault storms

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

try:  # grain worker processes need absl flags marked parsed
    from absl import flags

    flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_unet_bin(tmp_path_factory) -> Path:
    """The tiny U-Net as a PyTorch ``.bin`` release folder (``torch.save`` of the shipped safetensors tensors):
    the recorded reference files held the same tensors in both formats; only the safetensors copy ships."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from m3ddm_jax.assets import TINY_UNET

    d = tmp_path_factory.mktemp("tiny_unet_bin")
    shutil.copy(TINY_UNET / "config.json", d / "config.json")
    torch.save(load_file(TINY_UNET / "diffusion_pytorch_model.safetensors"), d / "diffusion_pytorch_model.bin")
    return d


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A ``--weights`` folder as ``python -m m3ddm_jax.download`` lays it out (``unet/`` + ``vae/``), holding the
    tiny models that ship in the package."""
    from m3ddm_jax.assets import TINY_UNET, TINY_VAE

    d = tmp_path_factory.mktemp("weights")
    (d / "unet").symlink_to(TINY_UNET)
    (d / "vae").symlink_to(TINY_VAE)
    return d


# -- TPU-compiler compiles in the background (tests/aot_jobs.py) ------------------------------------------

_AOT_KEY = pytest.StashKey()


def pytest_configure(config):
    config.addinivalue_line("markers", "aot_job(*names): the test reads these tests/aot_jobs.py compiles (run in "
                                       "the background from the end of collection; such tests run last)")


def _aot_names(items) -> list[str]:
    names: list[str] = []
    for item in items:
        for mark in item.iter_markers("aot_job"):
            names += [n for n in mark.args if n not in names]
    return names


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """Tests that wait for background compiles go last, so that the compiles overlap everything else."""
    waiting = [i for i in items if i.get_closest_marker("aot_job")]
    if waiting:
        items[:] = [i for i in items if not i.get_closest_marker("aot_job")] + waiting


def _lower_priority():
    # the compiles use what the suite leaves idle: the suite's own tests keep the cores first
    os.nice(10)


def pytest_collection_finish(session):
    from m3ddm_jax.aot import libtpu_available

    names = _aot_names(session.items)
    if not names or not libtpu_available() or session.config.option.collectonly:
        return
    import subprocess
    import sys
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="m3ddm_aot_jobs_"))
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "aot_jobs.py"), str(out), *names], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=(out / "runner.err").open("w"),
                            start_new_session=True, preexec_fn=_lower_priority)
    session.config.stash[_AOT_KEY] = (proc, out)


def pytest_sessionfinish(session):
    job = session.config.stash.get(_AOT_KEY, None)
    if job is not None and job[0].poll() is None:  # an interrupted or partial run: stop the compiles
        import signal

        try:
            os.killpg(job[0].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class AotJobs:
    """Results of the background compiles: ``wait(name)`` -> ``(exit code, JSON result or None, stdout, stderr)``."""

    def __init__(self, proc, out: Path):
        self.proc, self.out = proc, out

    def wait(self, name: str, timeout_s: float = 3600.0):
        import json
        import time

        rc_file = self.out / f"{name}.rc"
        t0 = time.monotonic()
        while not rc_file.exists():
            if self.proc.poll() is not None and not rc_file.exists():
                err = (self.out / "runner.err").read_text()[-2000:]
                raise AssertionError(f"the background compile runner stopped (exit {self.proc.returncode}) "
                                     f"before {name}: {err}")
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"background compile {name} not done after {timeout_s:.0f} s")
            time.sleep(2)
        res = self.out / f"{name}.json"
        return (int(rc_file.read_text()), json.loads(res.read_text()) if res.exists() else None,
                (self.out / f"{name}.out").read_text(), (self.out / f"{name}.err").read_text())


@pytest.fixture(scope="session")
def aot_jobs(request) -> AotJobs:
    job = request.config.stash.get(_AOT_KEY, None)
    if job is None:
        pytest.skip("no background TPU compiles (libtpu not installed)")
    return AotJobs(*job)
