"""M3DDM+ fine-tuning: jitted, sharded, resumable (``train.py``).

* :mod:`~m3ddm_jax.train.step` - the pure train/validation step functions and the optimizer;
* :mod:`~m3ddm_jax.train.sharding` - the device mesh, logical axis rules and FSDP parameter shardings;
* :mod:`~m3ddm_jax.train.checkpoint` - orbax checkpoints (state + data iterator + counters);
* :mod:`~m3ddm_jax.train.writer` - TensorBoard / JSONL logs;
* :mod:`~m3ddm_jax.train.trainer` - :class:`Trainer`, the loop tying them together.
"""
