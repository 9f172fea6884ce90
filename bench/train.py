"""Benchmark the jitted training step (not run by CI): step time, clips/s, peak memory.

One step = the whole train step of ``m3ddm_jax.train.step`` (frozen VAE encode of clip, masked clip and
global frames, masks, noise, U-Net forward + backward, Adam update, BatchNorm statistics) on a synthetic
uint8 batch already on the devices (data loading is excluded; ``--loader`` times the grain video loader).
Models are randomly initialised (U-Net and VAE), so no weights are needed.

    python bench/train.py                                   # tiny and mid, each in its own process
    python bench/train.py --configs mid --batch 4 --frames 16 --size 128 --dtype bfloat16 --remat
    python bench/train.py --configs full --batch 1 --frames 16 --size 256 --vae sd15 --dtype bfloat16 --remat

Prints per config: parameters, compile seconds, median step seconds (after one warm-up), clips/s, the
compiled executable's temporary memory, peak device memory (GPU/TPU ``peak_bytes_in_use``) and the
process's peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import UNET_CONFIGS as UNETS  # noqa: E402
# shape defaults per config (CPU-friendly; raise them on accelerators)
DEFAULTS = {"tiny": dict(batch=2, frames=4, global_frames=4, size=48, vae="tiny"),
            "mid": dict(batch=2, frames=8, global_frames=8, size=64, vae="tiny"),
            "full": dict(batch=1, frames=16, global_frames=16, size=256, vae="sd15")}
TINY_VAE = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def run_one(name: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from m3ddm_jax.models.unet3d import UNet3DConfig, param_count, unet_from_config
    from m3ddm_jax.models.vae import VAEConfig, vae_from_config
    from m3ddm_jax.train import sharding as S
    from m3ddm_jax.train.step import StepConfig, StepFns, init_state, make_optimizer, state_shardings

    d = dict(DEFAULTS[name])
    for k in d:
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    cfg = UNet3DConfig(**UNETS[name]) if UNETS[name] else UNet3DConfig()
    vcfg = VAEConfig.sd15() if d["vae"] == "sd15" else VAEConfig.from_dict(TINY_VAE)
    dtype = None if args.dtype == "float32" else jnp.dtype(args.dtype)
    opts = dict(dtype=dtype, remat=args.remat, attention_impl=args.attention)

    mesh = S.make_mesh({"data": -1, "fsdp": args.fsdp}, ("data", "fsdp"))
    sh = S.Shardings(mesh)
    t0 = time.perf_counter()
    abstract = nnx.eval_shape(lambda: unet_from_config(cfg, 0, **opts))
    gd, ap, ab = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    n_params = param_count(abstract)
    p_sh = sh.params_tree(nnx.to_pure_dict(ap))
    b_sh = sh.replicated_tree(nnx.to_pure_dict(ab))

    @jax.jit
    def init_unet():
        _, p, b = nnx.split(unet_from_config(cfg, 0, **opts), nnx.Param, nnx.BatchStat)
        return nnx.to_pure_dict(p), nnx.to_pure_dict(b)

    params, stats = jax.jit(init_unet, out_shardings=(p_sh, b_sh))()
    vabs = nnx.eval_shape(lambda: vae_from_config(vcfg, 0, dtype=dtype))
    vgd, _ = nnx.split(vabs)
    vstate = jax.jit(lambda: nnx.split(vae_from_config(vcfg, 0, dtype=dtype))[1],
                     out_shardings=sh.replicated)()
    init_s = time.perf_counter() - t0

    tx, sched = make_optimizer("adam", 1e-5)
    fns = StepFns(gd, vgd, tx, sched, StepConfig(batchnorm=args.batchnorm, latent_factor=vcfg.downscale))
    st_shapes = jax.eval_shape(lambda p, s: init_state(p, s, tx, seed=0, ema=False), params, stats)
    st_sh = state_shardings(st_shapes, sh)
    state = jax.jit(lambda p, s: init_state(p, s, tx, seed=0, ema=False), out_shardings=st_sh)(params, stats)
    del params, stats
    b, f, g, s = d["batch"], d["frames"], d["global_frames"], d["size"]
    rng = np.random.default_rng(0)
    batch = {"frames": rng.integers(0, 255, (b, f, s, s, 3), dtype=np.uint8),
             "global_frames": rng.integers(0, 255, (b, g, s, s, 3), dtype=np.uint8),
             "fps": np.full((b,), 8.0, np.float32)}
    batch = {k: jax.device_put(v, sh.for_batch(v)) for k, v in batch.items()}
    step = jax.jit(fns.train_step, in_shardings=(st_sh, sh.replicated_tree(vstate), sh.batch_tree(batch), sh.replicated),
                   out_shardings=(st_sh, sh.replicated), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, vstate, batch, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_gib = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else float("nan")
    state, m = compiled(state, vstate, batch, jnp.int32(0))  # warm-up
    jax.block_until_ready(m)
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        state, m = compiled(state, vstate, batch, jnp.int32(i + 1))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak_dev = None
    try:
        stats_ = jax.devices()[0].memory_stats() or {}
        peak_dev = stats_.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - CPU has no memory stats
        pass
    out = {"config": name, "device": str(jax.devices()[0].device_kind), "devices": len(jax.devices()),
           "params_M": round(n_params / 1e6, 3), **d, "dtype": args.dtype, "remat": args.remat,
           "batchnorm": args.batchnorm, "init_s": round(init_s, 1), "compile_s": round(compile_s, 1),
           "step_s": round(med, 4), "clips_per_s": round(b / med, 3), "loss": float(m["loss"]),
           "temp_gib": round(temp_gib, 3),
           "peak_device_gib": None if peak_dev is None else round(peak_dev / 2**30, 3),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if args.loader:
        out.update(time_loader(d, args))
    return out


def time_loader(d: dict, args) -> dict:
    """Clips/s of the grain video loader on synthetic videos (``--loader``)."""
    import tempfile

    from m3ddm_jax.data.synthetic import write_synthetic_videos
    from m3ddm_jax.data.video_folder import ClipSpec, find_videos, make_loader

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_videos(tmp, 8, num_frames=max(64, d["frames"] * 4), height=240, width=320)
        spec = ClipSpec(num_frames=d["frames"], num_global_frames=d["global_frames"], size=d["size"],
                        global_size=d["size"], min_frames=d["frames"])
        it = iter(make_loader(find_videos(tmp), spec, batch_size=d["batch"], seed=0, worker_count=args.workers))
        next(it)
        t = time.perf_counter()
        n = 10
        for _ in range(n):
            next(it)
        dt = time.perf_counter() - t
    return {"loader_workers": args.workers, "loader_clips_per_s": round(n * d["batch"] / dt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(UNETS))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--global-frames", dest="global_frames", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--vae", choices=["tiny", "sd15"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--batchnorm", default="per_video", choices=["per_video", "batch", "frozen"])
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loader", action="store_true", help="also time the grain video loader")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    for name in args.configs:
        argv = [a for a in sys.argv[1:]]
        if "--configs" in argv:
            i = argv.index("--configs")
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            del argv[i:j]
        r = subprocess.run([sys.executable, __file__, "--one", name, *argv], capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not lines:
            print(f"{name}: failed\n{r.stderr[-3000:]}")
            continue
        res = json.loads(lines[-1][7:])
        print(json.dumps(res))
        print(f"{name:5s} {res['params_M']:>9.3f} M params  batch {res['batch']} x {res['frames']}f @ {res['size']}px "
              f"({res['dtype']}{', remat' if res['remat'] else ''}) on {res['devices']}x {res['device']}: "
              f"compile {res['compile_s']} s, step {res['step_s']} s, {res['clips_per_s']} clips/s, "
              f"temp {res['temp_gib']} GiB, peak device {res['peak_device_gib']} GiB, peak RSS {res['peak_rss_gib']} GiB",
              flush=True)


if __name__ == "__main__":
    main()
