#!/usr/bin/env python
"""Inference speed and memory: seconds per denoising step and per video, square vs tight canvas.

    python bench/infer.py                 # tiny fixture U-Net + tiny VAE, 256-px output
    python bench/infer.py --full-compile  # + the full-size U-Net's window loop: lower + compile (no weights)
    python bench/infer.py --full-step     # + one real step of the full-size model (random weights, ~5 GB)
    python bench/infer.py --skip-tiny --report-overhead   # cost of the per-step progress callback
    python bench/infer.py --skip-tiny --throughput tiny,mid   # whole video: 4 rows vs 3 rows vs waves + 3 rows

Prints one line per measurement. Not run by CI.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from bench.common import peak_rss_gib  # noqa: E402
from m3ddm_jax.assets import TINY_UNET, TINY_VAE  # noqa: E402


def synthetic(n, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(xx * 3 + i) % 256, (yy * 2) % 256, np.full_like(xx, 128)], -1) for i in range(n)]).astype(np.uint8)


def bench_tiny(args):
    import jax

    from m3ddm_jax.interop.unet import load_unet
    from m3ddm_jax.interop.vae import load_vae
    from m3ddm_jax.outpaint.pipeline import OutpaintConfig, Outpainter

    unet = load_unet(TINY_UNET)
    vae = load_vae(TINY_VAE)
    frames = synthetic(args.frames, 192, 108)  # 9:16 source
    print(f"backend {jax.default_backend()}, {args.frames} frames 9:16 -> 16:9 at {args.size} px")
    for canvas in ("square", "tight"):
        times = {}
        for steps in (args.steps_lo, args.steps_hi):
            op = Outpainter(unet, vae, OutpaintConfig(ratio="16:9", output_size=args.size, canvas=canvas, steps=steps))
            t = time.perf_counter()
            r = op(frames, 24.0)
            first = time.perf_counter() - t
            t = time.perf_counter()
            r = op(frames, 24.0)
            times[steps] = time.perf_counter() - t
            print(f"  {canvas:6s} canvas {r.geometry.canvas_w}x{r.geometry.canvas_h}, {steps:2d} steps: {r.windows} windows, "
                  f"first run (with compiles) {first:.2f} s, warm {times[steps]:.2f} s/video", flush=True)
        per_step = (times[args.steps_hi] - times[args.steps_lo]) / ((args.steps_hi - args.steps_lo) * r.windows)
        per_video_50 = times[args.steps_hi] + (50 - args.steps_hi) * per_step * r.windows
        print(f"tiny, {canvas} canvas: {per_step * 1e3:.1f} ms per denoising step (U-Net batch 4 x 16 frames), "
              f"about {per_video_50:.1f} s per {args.frames}-frame video at 50 steps", flush=True)
    print(f"peak RSS {peak_rss_gib():.2f} GiB")


def bench_report_overhead(args):
    """The window loop (tiny U-Net, 16 frames, square canvas at --size) compiled with and without the per-step
    host callback that drives progress bars: warm seconds per step of each, best of --repeats."""
    import jax
    import jax.numpy as jnp

    from flax import nnx

    from m3ddm_jax.diffusion.schedule import ScheduleConfig
    from m3ddm_jax.interop.unet import load_unet
    from m3ddm_jax.outpaint.sampler import Guidance, _denoiser, report_steps

    unet = load_unet(TINY_UNET)
    graphdef, state = nnx.split(unet)
    h = w = args.size // 8
    key = jax.random.key(0)
    lat = jax.random.normal(key, (16, h, w, 4))
    msk = jnp.ones((16, h, w, 1))
    glob = jax.random.normal(key, (16, h, w, 4))
    per_step = {}
    for report in (False, True):
        den = _denoiser(graphdef, "plms", args.steps_hi, Guidance(), ScheduleConfig(), report)
        run = lambda: jax.block_until_ready(den(state, lat[None], lat, lat, msk, msk, glob, 24.0))  # noqa: E731
        with report_steps(lambda i: None):
            run()
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t)
        per_step[report] = best / den.spec.num_calls
    extra = per_step[True] - per_step[False]
    print(f"progress callback: {per_step[False] * 1e3:.2f} ms/step without, {per_step[True] * 1e3:.2f} ms/step with "
          f"-> {extra * 1e6:+.0f} us/step ({100 * extra / per_step[False]:+.2f}% of a tiny-model step at {args.size} px, "
          f"{jax.default_backend()})")


def bench_full(args):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m3ddm_jax.interop.unet import abstract_unet
    from m3ddm_jax.models.unet3d import UNet3DConfig
    from m3ddm_jax.outpaint.sampler import Guidance, build_denoiser

    cfg = UNet3DConfig()
    model = abstract_unet(cfg)
    den, state = build_denoiser(model, "plms", 50, Guidance())
    f, h, w = 16, 32, 32
    sds = lambda s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    lat = sds((1, f, h, w, 4))
    msk = sds((1, f, h, w, 1))
    t = time.perf_counter()
    lowered = den._jit.lower(state, sds((1, f, h, w, 4)), lat, lat, msk, msk, sds((1, 16, 32, 32, 4)), sds((1,)))
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = cost.get("flops", float("nan")) if cost else float("nan")
    print(f"full-size 50-step window loop: lower {t_lower:.1f} s, compile {t_compile:.1f} s, "
          f"XLA flops (loop body counted once) {flops:.3g}, peak RSS {peak_rss_gib():.2f} GiB")
    if args.full_step:
        from m3ddm_jax.models.unet3d import unet_from_config
        from m3ddm_jax.outpaint.sampler import combine, unet_rows

        real = unet_from_config(cfg, 0)
        gd, st = nnx.split(real)

        @jax.jit
        def one_step(st, x, cond, mask, glob):
            m = nnx.merge(gd, st)
            rows = unet_rows(x, cond, cond, mask, jnp.ones_like(mask), Guidance())
            return combine(m(rows, 961, glob, 24, guidance=4), Guidance())

        key = jax.random.key(0)
        args_ = (st, jax.random.normal(key, (1, f, h, w, 4)), jax.random.normal(key, (f, h, w, 4)),
                 jnp.ones((f, h, w, 1)), jax.random.normal(key, (16, 32, 32, 4)))
        t = time.perf_counter()
        jax.block_until_ready(one_step(*args_))
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(one_step(*args_))
        t2 = time.perf_counter() - t
        print(f"full-size one guided step (batch 4 x 16 frames, 32x32 latents): first {t1:.1f} s (with compile), "
              f"warm {t2:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")


def bench_throughput(args):
    """One 69-frame 9:16 video to 16:9 at ``--size``: the whole video, side by side, with the compile count:
    sequential windows with the reference's 4 guidance rows (the old default), sequential with 3 rows, and
    waves + 3 rows (auto windows per call; and ``--wave-batch`` windows per call)."""
    import jax

    from bench.common import UNET_CONFIGS
    from m3ddm_jax.interop.vae import load_vae
    from m3ddm_jax.models.unet3d import unet_from_config
    from m3ddm_jax.outpaint.pipeline import OutpaintConfig, Outpainter
    from m3ddm_jax.interop.unet import load_unet

    vae = load_vae(TINY_VAE)
    frames = synthetic(69, 192, 108)
    variants = [("sequential, 4 rows", dict(schedule="sequential", guidance_rows=4)),
                ("sequential, 3 rows", dict(schedule="sequential", guidance_rows=3)),
                ("waves (auto batch), 3 rows", dict(schedule="waves")),
                (f"waves ({args.wave_batch} per call), 3 rows", dict(schedule="waves", window_batch=args.wave_batch))]
    print(f"backend {jax.default_backend()} x {jax.local_device_count()}, 69 frames 9:16 -> 16:9 at {args.size} px, "
          f"{args.tp_steps} PLMS steps, strides 15,5,1 (7 windows, 3 waves)", flush=True)
    for name in args.throughput.split(","):
        unet = load_unet(TINY_UNET) if name == "tiny" else unet_from_config(UNET_CONFIGS[name], 0)
        base = None
        for label, kw in variants:
            op = Outpainter(unet, vae, OutpaintConfig(ratio="16:9", output_size=args.size, steps=args.tp_steps, **kw))
            traces0 = op.denoiser.trace_count
            t = time.perf_counter()
            r = op(frames, 24.0)
            first = time.perf_counter() - t
            warm = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                op(frames, 24.0)
                warm.append(time.perf_counter() - t)
            best = min(warm)
            base = base or best
            print(f"  {name:4s} {label:28s}: {best:7.2f} s/video warm (x{base / best:.2f} vs 4 rows), first run "
                  f"{first:.1f} s, {op.denoiser.trace_count - traces0} new compile(s), {r.windows} windows in "
                  f"{r.waves} waves, {op.window_batch(tuple(s // 8 for s in (r.geometry.canvas_h, r.geometry.canvas_w)))}"
                  f" per call", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps-lo", type=int, default=5)
    p.add_argument("--steps-hi", type=int, default=15)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--full-compile", action="store_true")
    p.add_argument("--full-step", action="store_true")
    p.add_argument("--report-overhead", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--throughput", default="", help="comma list of tiny,mid,full: whole-video variants")
    p.add_argument("--tp-steps", type=int, default=4, help="denoising steps for --throughput")
    p.add_argument("--wave-batch", type=int, default=5, help="windows per call for the explicit waves variant")
    args = p.parse_args()
    if not args.skip_tiny:
        bench_tiny(args)
    if args.report_overhead:
        bench_report_overhead(args)
    if args.throughput:
        bench_throughput(args)
    if args.full_compile or args.full_step:
        bench_full(args)


if __name__ == "__main__":
    main()
