"""Shared helpers of the benchmark scripts (never run by CI)."""
from __future__ import annotations

import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, *args, repeat: int = 1):
    """``(result, seconds per call)`` of ``fn(*args)`` with results blocked on."""
    import jax  # noqa: PLC0415

    out = None
    t = time.perf_counter()
    for _ in range(repeat):
        out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - t) / repeat


# U-Net configs the benchmarks measure: the golden-fixture tiny model, the mid config, the release.
UNET_CONFIGS = {
    # the golden-fixture tiny config (widths 8, 12; 4 heads; 4 groups)
    "tiny": dict(in_channels=9, out_channels=4, block_out_channels=[8, 12], layers_per_block=2,
                 down_block_types=["CrossAttnDownBlock3D", "DownBlockP3D"],
                 up_block_types=["UpBlockP3D", "CrossAttnUpBlock3D"], norm_num_groups=4,
                 attention_head_dim=4, cross_attention_dim=320),
    "mid": dict(in_channels=9, out_channels=4, block_out_channels=[64, 128, 256, 256], layers_per_block=2,
                down_block_types=["CrossAttnDownBlock3D"] * 3 + ["DownBlockP3D"],
                up_block_types=["UpBlockP3D"] + ["CrossAttnUpBlock3D"] * 3, norm_num_groups=32,
                attention_head_dim=8, cross_attention_dim=320),
    "full": {},  # the released model (UNet3DConfig defaults)
}
