"""A tiny model for tests and smoke runs (CPU): the tiny U-Net (widths 8/12) and VAE that ship in the
package (``m3ddm_jax/assets/tiny``, the golden-parity models), 48-px clips of 4 frames, 4 global frames,
batch 2, Adam 1e-3.

    python train.py --config configs/tiny.py --config.data.dir=VIDEOS --workdir /tmp/tiny_run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import m3ddm_plus  # noqa: E402
from m3ddm_jax.assets import TINY_UNET, TINY_VAE  # noqa: E402


def get_config():
    c = m3ddm_plus.get_config()
    c.name = "tiny"
    c.model.init = str(TINY_UNET)   # '' + model.unet_config for a random init
    c.model.unet_config = str(TINY_UNET / "config.json")
    c.model.vae = str(TINY_VAE)
    c.model.attention_budget_mib = 0.0   # 0 = no query chunking
    c.data.num_frames = 4
    c.data.num_global_frames = 4
    c.data.size = 48
    c.data.global_size = 48
    c.data.min_frames = 8
    c.data.max_stride = 4
    c.data.worker_count = 0
    c.train.batch_size = 2
    c.train.steps = 20
    c.optim.lr = 1e-3
    c.checkpoint.every = 10
    c.log.every = 5
    c.val.every = 10
    c.val.batches = 1
    c.export.dtype = "float32"
    return c
