"""Data that ships with the package.

``tiny/``: a tiny randomly initialised M3DDM U-Net (widths 8/12, 2.3 MB) and a tiny SD-style VAE
(0.3 MB), both in the released PyTorch/diffusers layout. They are the golden-parity models of the test
suite (recorded against the PyTorch reference) and the weights of ``configs/tiny.py``, the README's CPU
smoke runs and the demo's offline mode: ``--weights tiny``. Their output is noise-like: they exist to
exercise every code path in seconds, not to produce pictures.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
TINY = ASSETS / "tiny"
TINY_UNET = TINY / "unet"
TINY_VAE = TINY / "vae"

__all__ = ["ASSETS", "TINY", "TINY_UNET", "TINY_VAE"]
