#!/usr/bin/env python
"""Resident memory of loading the full-size U-Net and of one full window step after it (issue 9 item 6).

Full-size weights cannot be downloaded here, so ``make`` writes random ones in the released layouts, one
tensor at a time (never the whole model in memory), from the model's own key table:

    python bench/load.py make /tmp/fullsize   # torch/ (PyTorch safetensors, 4.84 GiB), flax/ (converted
                                              # layout, same weights), vae/ (SD-1.5 VAE size, 0.31 GiB)

``run`` measures, each in a fresh child process (glibc malloc tuned as infer.py / eval.py do it):
``load_unet`` (RSS = ``VmRSS`` after loading and ``gc.collect()``, peak = ``VmHWM`` so far), then with
``--step`` one jit-compiled guided window step at the full config (``guidance`` rows x 16 frames, 32x32
latents = 256-px output, 16 global frames; the step the Outpainter runs per denoising step) and the peak
RSS of the whole process. ``--repo`` picks the checkout whose ``m3ddm_jax`` is measured, so BEFORE/AFTER
compare two commits:

    git worktree add /tmp/before <commit-before-the-change>
    nice -n 10 python bench/load.py run --weights /tmp/fullsize/torch --step --repo /tmp/before --label before
    nice -n 10 python bench/load.py run --weights /tmp/fullsize/torch --step --label after

Each run appends one JSON line to ``--out`` (default ``bench/load_results.jsonl``). The weights are random, so
the step's output means nothing (it is not even finite: ``finite`` is reported, not checked). Never run by CI.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_gib() -> float:
    return _status_kib("VmRSS") / 2**20


def hwm_gib() -> float:
    return _status_kib("VmHWM") / 2**20


# -- make ------------------------------------------------------------------------------------------------

def _random_tensor(i: int, key: str, shape: tuple, is_int: bool):
    """Deterministic random weights of a plausible scale (a function of the index: both layouts agree)."""
    import numpy as np  # noqa: PLC0415

    if is_int:
        return np.zeros(shape, np.int64)
    rng = np.random.default_rng(i)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return noise + np.float32(1.0) if key.endswith("weight") else noise


def make(dest: Path) -> None:
    import numpy as np  # noqa: PLC0415

    sys.path.insert(0, str(REPO))
    from m3ddm_jax.interop.keymap import path_to_str, torch_to_flax_array  # noqa: PLC0415
    from m3ddm_jax.interop.tensor_files import write_safetensors  # noqa: PLC0415
    from m3ddm_jax.interop.unet import unet_key_table  # noqa: PLC0415
    from m3ddm_jax.interop.vae import vae_key_table  # noqa: PLC0415
    from m3ddm_jax.models.unet3d import UNet3DConfig  # noqa: PLC0415
    from m3ddm_jax.models.vae import VAEConfig  # noqa: PLC0415

    sd_vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                  layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
    for kind, cfg, table in (("unet", UNet3DConfig(), unet_key_table(UNet3DConfig())),
                             ("vae", VAEConfig.from_dict(sd_vae), vae_key_table(VAEConfig.from_dict(sd_vae)))):
        index = {e.torch_key: (i, e) for i, e in enumerate(table.entries)}
        by_flax = {path_to_str(e.flax_path): (i, e) for i, e in enumerate(table.entries)}
        conf = cfg.to_dict()
        layouts = [("torch" if kind == "unet" else "vae", "diffusion_pytorch_model.safetensors")]
        if kind == "unet":
            layouts.append(("flax", "flax_model.safetensors"))
        for sub, fname in layouts:
            folder = dest / sub
            if (folder / fname).is_file():
                print(f"{folder / fname} exists")
                continue
            folder.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            if sub == "flax":
                specs = [(path_to_str(e.flax_path), e.flax_shape, np.int32 if e.is_int else np.float32)
                         for e in table.entries]

                def tensor(name, by_flax=by_flax):
                    i, e = by_flax[name]
                    return torch_to_flax_array(_random_tensor(i, e.torch_key, e.torch_shape, e.is_int), e.flax_shape)

                conf_out = dict(conf, _m3ddm_jax={"format": "flax-safetensors", "version": 1, "kind": "unet"})
            else:
                specs = [(e.torch_key, e.torch_shape, np.int64 if e.is_int else np.float32) for e in table.entries]

                def tensor(name, index=index):
                    i, e = index[name]
                    return _random_tensor(i, e.torch_key, e.torch_shape, e.is_int)

                conf_out = conf
            tmp = folder / f".{fname}.partial"
            write_safetensors(tmp, specs, tensor, {"format": "pt" if sub != "flax" else "np"})
            os.replace(tmp, folder / fname)
            (folder / "config.json").write_text(json.dumps(conf_out, indent=2, sort_keys=True) + "\n")
            print(f"{folder / fname}: {(folder / fname).stat().st_size / GIB:.2f} GiB, {len(specs)} tensors, "
                  f"{time.perf_counter() - t:.0f} s, peak RSS {hwm_gib():.2f} GiB", flush=True)


# -- run -------------------------------------------------------------------------------------------------

def child(args) -> dict:
    sys.path.insert(0, str(Path(args.repo).resolve()))
    from m3ddm_jax.runtime import tune_malloc  # noqa: PLC0415

    if not args.no_malloc_tuning:
        tune_malloc()
    import gc  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    import m3ddm_jax  # noqa: PLC0415
    from m3ddm_jax.interop.unet import load_unet  # noqa: PLC0415

    jnp.zeros(1).block_until_ready()  # the runtime up, before the baseline
    res = {"module": str(Path(m3ddm_jax.__file__).parent), "rss_start_gib": round(rss_gib(), 3)}
    t = time.perf_counter()
    model = load_unet(args.weights)
    gc.collect()
    res["load_s"] = round(time.perf_counter() - t, 1)
    leaves = jax.tree_util.tree_leaves(nnx.state(model))
    res["param_gib"] = round(sum(x.nbytes for x in leaves) / GIB, 3)
    res["rss_after_load_gib"] = round(rss_gib(), 3)
    res["peak_after_load_gib"] = round(hwm_gib(), 3)
    print(f"loaded: {json.dumps(res)}", file=sys.stderr, flush=True)
    if args.vae:
        from m3ddm_jax.interop.vae import load_vae  # noqa: PLC0415

        before = rss_gib()
        vae = load_vae(args.vae)
        gc.collect()
        vleaves = jax.tree_util.tree_leaves(nnx.state(vae))
        res["vae_param_gib"] = round(sum(x.nbytes for x in vleaves) / GIB, 3)
        res["vae_rss_added_gib"] = round(rss_gib() - before, 3)
        res["peak_after_vae_gib"] = round(hwm_gib(), 3)
        del vae, vleaves
    if args.step:
        cfg = model.config
        graphdef, state = nnx.split(model)
        del model, leaves
        gc.collect()
        b, g, f, h = 1, args.guidance, args.frames, args.latent
        rng = np.random.default_rng(0)
        sample = jnp.asarray(rng.standard_normal((b * g, f, h, h, cfg.in_channels), np.float32))
        glat = jnp.asarray(rng.standard_normal((b * args.global_frames, h, h, 4), np.float32))
        tt, fps = jnp.asarray(961, jnp.int32), jnp.asarray(6, jnp.int32)

        def step(state, sample, tt, glat, fps):
            return nnx.merge(graphdef, state)(sample, tt, glat, fps, guidance=g)

        t = time.perf_counter()
        compiled = jax.jit(step).lower(state, sample, tt, glat, fps).compile()
        res["compile_s"] = round(time.perf_counter() - t, 1)
        res["peak_after_compile_gib"] = round(hwm_gib(), 3)
        mem = compiled.memory_analysis()
        if mem is not None:
            res["xla_arg_gib"] = round(mem.argument_size_in_bytes / GIB, 3)
            res["xla_temp_gib"] = round(mem.temp_size_in_bytes / GIB, 3)
        t = time.perf_counter()
        out = np.asarray(compiled(state, sample, tt, glat, fps))
        res["step_s"] = round(time.perf_counter() - t, 1)
        res["finite"] = bool(np.isfinite(out).all())
        res["rss_after_step_gib"] = round(rss_gib(), 3)
    res["peak_gib"] = round(hwm_gib(), 3)
    return res


def run(args) -> int:
    repo = Path(args.repo).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "m3ddm_jax"], cwd=repo, capture_output=True,
                           text=True).stdout.strip()
    cmd = [sys.executable, __file__, "child", "--weights", args.weights, "--repo", str(repo),
           "--guidance", str(args.guidance), "--frames", str(args.frames), "--latent", str(args.latent),
           "--global-frames", str(args.global_frames)]
    cmd += (["--step"] if args.step else []) + (["--vae", args.vae] if args.vae else [])
    cmd += ["--no-malloc-tuning"] if args.no_malloc_tuning else []
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(f"FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}")
        return 1
    res = json.loads(line[len("RESULT "):])
    row = dict(label=args.label or commit, commit=commit + ("+dirty" if dirty else ""), weights=args.weights,
               step=args.step, guidance=args.guidance if args.step else None,
               malloc_tuned=not args.no_malloc_tuning, **res, wall_s=round(time.perf_counter() - t, 1),
               when=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    print(f"{row['label']}: {row['param_gib']:.2f} GiB of parameters; RSS after load_unet "
          f"{row['rss_after_load_gib']:.2f} GiB (peak while loading {row['peak_after_load_gib']:.2f} GiB)"
          + (f"; window step (guidance {args.guidance}) peak {row['peak_gib']:.2f} GiB, XLA temporaries "
             f"{row.get('xla_temp_gib', float('nan')):.2f} GiB" if args.step else ""), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write random full-size weights (torch/, flax/, vae/) into a folder")
    m.add_argument("dest", type=Path)
    for name in ("run", "child"):
        r = sub.add_parser(name, help="measure in a child process" if name == "run" else argparse.SUPPRESS)
        r.add_argument("--weights", required=True, help="a U-Net folder (PyTorch or converted Flax layout)")
        r.add_argument("--vae", default=None, help="also load this VAE folder and report its resident memory")
        r.add_argument("--step", action="store_true", help="also compile and run one full window step")
        r.add_argument("--guidance", type=int, default=4, help="guidance rows of the step (4: the reference's)")
        r.add_argument("--frames", type=int, default=16)
        r.add_argument("--latent", type=int, default=32, help="latent side (output size / 8)")
        r.add_argument("--global-frames", type=int, default=16)
        r.add_argument("--repo", default=str(REPO), help="checkout whose m3ddm_jax is measured (default this one)")
        r.add_argument("--label", default=None)
        r.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default malloc settings")
        r.add_argument("--out", default=str(REPO / "bench" / "load_results.jsonl"))
    args = p.parse_args(argv)
    if args.cmd == "make":
        make(args.dest)
        return 0
    if args.cmd == "child":
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
