"""PyTorch <-> Flax conversion command line: ``python -m convert SRC DST`` (see m3ddm_jax.interop.cli)."""
