"""The TPU-compiler compiles of ``tests/test_aot.py``, run in the background while the rest of the suite runs.

Each compile of the full model takes minutes of one core on a CI machine (the full-size inference window about
10), and the suite's other tests leave a core idle most of the time. So ``tests/conftest.py`` starts this file
as one background process as soon as collection has finished (only when libtpu is installed and some selected
test needs a job), moves the AOT tests to the end of the run, and each test then waits for its job's result.

Every job is one run of the real command line, ``python -m m3ddm_jax.aot ... --json OUT/NAME.json``, in its own
process (one at a time, so memory is given back between compiles); its exit code goes to ``OUT/NAME.rc`` and
its stdout/stderr to ``OUT/NAME.out`` / ``OUT/NAME.err``, written last, so ``NAME.rc`` existing means done.

    python tests/aot_jobs.py OUT [NAME ...]      # run jobs (default: all) into folder OUT
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the mid U-Net (bench/common.py) with short clips, so that the mid-config compiles stay a few minutes
_MID = "{mid}"
_MID_CLIPS = ["--config.data.num_frames=4", "--config.data.num_global_frames=4", "--config.data.min_frames=4",
              "--config.data.size=64", "--config.data.global_size=64"]

JOBS: dict[str, list[str]] = {
    # the trainer's train step, mid U-Net, data 2 x fsdp 4 over a v5e-8, bf16 compute, fp32 Adam
    "mid-train-v5e8": ["--topology", "v5e:2x4", "--what", "train", f"--config.model.unet_config={_MID}",
                       "--config.model.vae={tiny_vae}", "--config.model.compute_dtype=bfloat16", *_MID_CLIPS,
                       "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=4", "--batch", "8"],
    # the sampler's denoiser over one window, mid U-Net, bf16 parameters sharded over the v5e-8's chips
    "mid-infer-v5e8": ["--topology", "v5e:2x4", "--what", "infer", f"--config.model.unet_config={_MID}",
                       "--frames", "4", "--size", "64", "--global-frames", "4", "--steps", "2"],
    # the full model that does not fit one v5e chip: fp32, the reference's 4 guidance rows, unchunked attention
    "full-infer-v5e1-fp32-unchunked": ["--topology", "v5e:1x1", "--what", "infer", "--dtype", "float32",
                                       "--rows", "4", "--attention-budget-mib", "none", "--steps", "2"],
    # the default window exactly as users run it, on ONE v5e chip: 3 rows, bf16, chunked attention, 50 PLMS steps
    "full-infer-v5e1-bf16": ["--topology", "v5e:1x1", "--what", "infer", "--dtype", "bfloat16"],
}


def argv_of(name: str, out: Path) -> list[str]:
    from m3ddm_jax.assets import TINY_VAE

    sys.path.insert(0, str(REPO))
    from bench.common import UNET_CONFIGS

    mid = out / "mid_unet.json"
    if not mid.exists():
        tmp = mid.with_suffix(".tmp")
        tmp.write_text(json.dumps(UNET_CONFIGS["mid"]))
        tmp.replace(mid)
    return [a.format(mid=mid, tiny_vae=TINY_VAE) for a in JOBS[name]]


def run(name: str, out: Path) -> int:
    cmd = [sys.executable, "-m", "m3ddm_jax.aot", *argv_of(name, out), "--json", str(out / f"{name}.json")]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (out / f"{name}.out").write_text(p.stdout)
    (out / f"{name}.err").write_text(p.stderr)
    tmp = out / f"{name}.rc.tmp"
    tmp.write_text(str(p.returncode))
    tmp.replace(out / f"{name}.rc")
    return p.returncode


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in argv[1:] or list(JOBS):
        run(name, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
