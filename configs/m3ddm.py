"""The paper's ablation: the same fine-tuning as ``m3ddm_plus.py`` with M3DDM's per-frame random masks
(four 0.2 / two 0.1 / one 0.35 / random 0.1 / full frame 0.25, width U[0.15, 0.75], drawn per frame)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import m3ddm_plus  # noqa: E402


def get_config():
    c = m3ddm_plus.get_config()
    c.name = "m3ddm_per_frame"
    c.mask.mode = "per_frame"
    c.mask.preset = ""
    c.mask.probs = (0.2, 0.1, 0.35, 0.1, 0.25)
    return c
