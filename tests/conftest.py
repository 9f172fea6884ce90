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
