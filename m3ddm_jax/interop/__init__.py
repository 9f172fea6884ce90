"""PyTorch <-> Flax interoperability: state-dict I/O, layout rules and key tables.

The command line lives in :mod:`m3ddm_jax.interop.cli` (``python -m convert`` from the repository).
"""
