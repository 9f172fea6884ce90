"""Benchmark one guidance window step of the M3DDM U-Net (not run by CI).

One step = the inference call of the per-window sampler with two-factor guidance: batch B' = 4
(``guidance=4``, b = 1), F = 16 frames, 32x32 latents, 16 global frames of 32x32 latents.

    python bench/unet.py                      # tiny and mid configs, each in its own process
    python bench/unet.py --configs tiny mid full
    python bench/unet.py --configs mid --dtype bfloat16 --budget-mib 64

Prints, per config: parameter count, compile time, run time (median of --repeats after one warm-up),
the compiled executable's memory analysis (arguments / temporaries / outputs) and the process's peak
resident memory (``ru_maxrss``, includes the weights and the compiler). Each config runs in a fresh
subprocess so the peak RSS belongs to that config alone.

Reference (PyTorch CPU, same machine class, mid config): 200 s and 13.8 GiB per step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# glibc malloc settings for XLA:CPU. XLA allocates the large intermediates of an executable (attention
# scores, ...) at every run; with glibc's defaults they come from fresh mmap'd pages (or per-thread arenas that
# are madvise'd away on free), so every run page-faults through all of them. On this VM a fault costs
# ~2-20 us, which made a tiny-config step 26 s (70% system time) instead of ~11 s. One arena, no mmap and no
# trimming keeps the pages mapped and reuses them. Set the same variables for any CPU inference/training run.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}

from bench.common import UNET_CONFIGS as CONFIGS  # noqa: E402


def _patch_unnormalized_softmax() -> None:
    """Measurement aid for a proposed change to m3ddm_jax/models/attention.py (not applied there): exponentiate
    the scores without normalising them and divide the (Lq, D) output by the row sums instead, which saves
    one read+write pass over the (B, H, Lq, Lk) score tensor. Same math; float rounding differs slightly."""
    import math

    import jax
    import jax.numpy as jnp

    from m3ddm_jax.models import attention as attn_mod

    def _xla_attention(q, k, v):
        scale = 1.0 / math.sqrt(q.shape[-1])
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
        denom = jnp.sum(p, axis=-1)  # (b, h, q)
        out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (out / jnp.swapaxes(denom, 1, 2)[..., None]).astype(v.dtype)

    attn_mod._xla_attention = _xla_attention


def _budget(value: str):
    if value == "auto":
        return "auto"
    return None if float(value) <= 0 else float(value)


def run_one(name: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from m3ddm_jax.models.unet3d import UNet3DConfig, param_count, unet_from_config

    if args.attention_variant == "unnormalized":
        _patch_unnormalized_softmax()
    cfg = UNet3DConfig(**CONFIGS[name]) if CONFIGS[name] else UNet3DConfig()
    dtype = None if args.dtype == "float32" else jnp.dtype(args.dtype)
    t0 = time.perf_counter()
    model = unet_from_config(cfg, 0, dtype=dtype, attention_impl=args.attention,
                             attention_budget_mib=_budget(args.budget_mib))
    init_s = time.perf_counter() - t0
    n_params = param_count(model)
    graphdef, state = nnx.split(model)
    del model

    b, guidance, f, h, g, hg = 1, 4, args.frames, args.latent, args.global_frames, args.latent
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((b * guidance, f, h, h, cfg.in_channels), np.float32))
    glat = jnp.asarray(rng.standard_normal((b * g, hg, hg, 4), np.float32))
    t = jnp.asarray(961, jnp.int32)
    fps = jnp.asarray(6, jnp.int32)

    def step(state, sample, t, glat, fps):
        return nnx.merge(graphdef, state)(sample, t, glat, fps, guidance=guidance)

    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(state, sample, t, glat, fps)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    t0 = time.perf_counter()
    out = compiled(state, sample, t, glat, fps)
    out.block_until_ready()  # first run (warm-up): page-faults in the buffers
    first_s = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(args.repeats):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        compiled(state, sample, t, glat, fps).block_until_ready()
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {
        "config": name,
        "params": n_params,
        "dtype": args.dtype,
        "attention": args.attention,
        "budget_mib": args.budget_mib,
        "init_s": round(init_s, 2),
        "compile_s": round(compile_s, 2),
        "first_run_s": round(first_s, 2),
        "run_s_median": round(statistics.median(times), 3) if times else None,
        "run_s_all": [round(x, 3) for x in times],
        "cpu_s_median": round(statistics.median(cpu), 2) if cpu else None,
        "attention_variant": args.attention_variant,
        "peak_rss_gib": round(rss / 2**30, 3),
        "xla_flops_G": round(float(cost.get("flops", float("nan"))) / 1e9, 2) if cost else None,
        "finite": bool(np.isfinite(np.asarray(out, np.float32)).all()),
    }
    if mem is not None:
        res.update(
            arg_gib=round(mem.argument_size_in_bytes / 2**30, 3),
            temp_gib=round(mem.temp_size_in_bytes / 2**30, 3),
            out_gib=round(mem.output_size_in_bytes / 2**30, 4),
        )
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--attention", default="xla", choices=["xla", "dot_product", "cudnn"])
    p.add_argument("--budget-mib", default="auto", help="attention score budget per chunk in MiB, 'auto' (default) "
                   "or <=0 for no chunking")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the first (0: only the first run)")
    p.add_argument("--attention-variant", default="as-is", choices=["as-is", "unnormalized"],
                   help="'unnormalized': measure the proposed softmax change (monkeypatched, see above)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--global-frames", type=int, default=16)
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="run the children with the inherited glibc malloc settings (see MALLOC_ENV)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args)), flush=True)
        return 0

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    # drop --configs and its values from the passthrough
    cleaned, skip = [], False
    for a in passthrough:
        if a == "--configs":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        cleaned.append(a)
    env = dict(os.environ)
    if not args.no_malloc_tuning:
        for k, v in MALLOC_ENV.items():
            env.setdefault(k, v)
    for name in args.configs:
        proc = subprocess.run([sys.executable, __file__, "--child", name, *cleaned], capture_output=True, text=True,
                              env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(line[len("RESULT "):])
        print(f"{name:5s} params {r['params']:>13,d}  compile {r['compile_s']:.2f} s  "
              f"first run {r['first_run_s']} s  run {r['run_s_median']} s (runs {r['run_s_all']}, "
              f"CPU {r['cpu_s_median']} s)  peak RSS {r['peak_rss_gib']:.2f} GiB  "
              f"XLA temp {r.get('temp_gib', float('nan')):.2f} GiB  args {r.get('arg_gib', float('nan')):.2f} GiB  "
              f"XLA flops {r['xla_flops_G']} G  [{r['dtype']}, attention {r['attention']}, "
              f"budget {r['budget_mib']} MiB, softmax {r['attention_variant']}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
