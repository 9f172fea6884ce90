#!/usr/bin/env python
"""Outpaint a video (or an image) with M3DDM+.

    python infer.py INPUT --ratio 16:9 --output OUT.mp4 [--weights W] [--seed N] [--pad ...]
                    [--output-size N] [--full-res] [--canvas tight] ...

Several ratios at once (``--ratio 16:9,1:1``) write one output each (``OUT_16-9.mp4``, ``OUT_1-1.mp4``).
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from m3ddm_jax.cli_common import OneLineParser, run_main
from m3ddm_jax.runtime import tune_malloc

tune_malloc()  # see m3ddm_jax/runtime.py: XLA CPU buffers without mmap page-fault storms
from m3ddm_jax.errors import UserError
from m3ddm_jax.weights import WEIGHTS_HELP


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="infer.py", description="M3DDM+ video outpainting (JAX).")
    p.add_argument("input", help="input video (mp4/mov/avi/webm/...) or image (png/jpg; treated as a 1-frame video)")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--ratio", default=None,
                     help="target aspect ratio(s) W:H, comma-separated for several outputs (default 16:9)")
    tgt.add_argument("--pad", default=None,
                     help="per-side outpainting in source pixels instead of a ratio: left=N,right=N,top=N,bottom=N "
                          "(or four integers l,r,t,b)")
    p.add_argument("--output", "-o", default=None,
                   help="output file; the extension decides the format: .mp4/.m4v/.mov/.mkv (H.264), .webm (VP9), "
                        ".gif, or .png/.jpg for a 1-frame input (anything else is refused); with several ratios a "
                        "_W-H suffix is added. Default: <input stem>_<W>-<H>.mp4 in the current folder")
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--vae", default=None, help="VAE folder or hub id (default: stable-diffusion-v1-5 vae, or weights/vae)")
    p.add_argument("--seed", type=int, default=6, help="seed for every random draw (default 6, as the reference)")
    p.add_argument("--output-size", type=int, default=256, help="long side of the output in pixels (default 256)")
    p.add_argument("--full-res", action="store_true",
                   help="keep the source pixels at source size; the generated border is upscaled around them")
    p.add_argument("--feather", type=int, default=0, help="with --full-res: feather the seam over N output pixels (default 0)")
    p.add_argument("--canvas", choices=("square", "tight"), default="square",
                   help="model canvas: the reference's square, or the target shape rounded up to multiples of 64 (faster)")
    p.add_argument("--strides", default="15,5,1", help="coarse-to-fine strides (default 15,5,1; stride 1 only below 50 frames)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--sampler", choices=("plms", "ddim"), default="plms", help="sampler (default plms, as the reference)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="local (masked video) guidance scale (default 2)")
    p.add_argument("--global-guidance-scale", type=float, default=4.0, help="global-frame guidance scale (default 4)")
    p.add_argument("--global-frames", type=int, default=16, help="number of global frames (default 16)")
    p.add_argument("--limit", type=int, default=None, help="outpaint only the first N frames")
    p.add_argument("--png-frames", default=None, metavar="DIR",
                   help="also write every output frame as PNG into DIR (new, empty, or holding only earlier frames)")
    p.add_argument("--lossless", action="store_true",
                   help="lossless RGB video (H.264 RGB, or VP9 lossless for .webm) instead of yuv420p")
    p.add_argument("--crf", type=int, default=18, help="H.264 / VP9 quality (default 18; lower is better)")
    p.add_argument("--no-audio", action="store_true", help="do not copy the source audio")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype of the models (default float32)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def _outputs(args, input_path: Path, ratios: list[str] | None) -> list[Path]:
    suffixes = [r.replace(":", "-") for r in ratios] if ratios else ["pad"]
    if args.output is None:
        return [Path.cwd() / f"{input_path.stem}_{s}.mp4" for s in suffixes]
    out = Path(args.output)
    if len(suffixes) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{s}{out.suffix}") for s in suffixes]


def _png_folder(png_frames: str, out: Path, n_outputs: int) -> Path:
    folder = Path(png_frames)
    if n_outputs > 1:
        folder = folder.with_name(f"{folder.name}_{out.stem.rsplit('_', 1)[-1]}")
    return folder


def _has_audio(path: Path) -> bool:
    import av

    try:
        with av.open(str(path)) as c:
            return bool(c.streams.audio)
    except Exception:
        return False


def _summary(result, written: tuple[int, int]) -> str:
    """The result's summary with the size of the file as written (yuv420p drops an odd last row/column)."""
    text = result.summary()
    rh, rw = result.shape[1:3]
    fw, fh = written
    if (fw, fh) != (rw, rh):
        size = f"{rw}x{rh}"
        new = f"{fw}x{fh} (yuv420p needs even sizes: {rw}x{rh} cropped)"
        text = text.replace(f"-> {size}", f"-> {new}", 1) if f"-> {size}" in text else f"{text}; written {new}"
    return text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from m3ddm_jax.outpaint.geometry import parse_pad, parse_ratio
        from m3ddm_jax.outpaint.windows import parse_strides
        from m3ddm_jax.video import (PngFramesWriter, VideoReader, VideoWriter, check_frames_folder, check_writable,
                                     written_size)

        # cheap checks first: arguments, input, output folder; then weights; then compute
        ratios = None
        pad = None
        if args.pad is not None:
            pad = parse_pad(args.pad)
        else:
            ratios = [r.strip() for r in (args.ratio or "16:9").split(",") if r.strip()]
            if not ratios:
                raise UserError("--ratio is empty")
            for r in ratios:
                parse_ratio(r)
        strides = parse_strides(args.strides)
        if args.output_size < 64:
            raise UserError(f"--output-size must be at least 64, got {args.output_size}")
        input_path = Path(args.input)
        video = VideoReader(input_path)  # frames are decoded as a stream, twice: never all in memory
        outputs = _outputs(args, input_path, ratios)
        n_out = video.num_frames if args.limit is None else max(0, min(args.limit, video.num_frames))
        for o in outputs:  # the extension decides the format; refused here, before any compute, if it cannot
            check_writable(o, num_frames=n_out, lossless=args.lossless)
            if o.resolve() == input_path.resolve():
                raise UserError(f"output {o} would overwrite the input")
        png_folders = [_png_folder(args.png_frames, o, len(outputs)) for o in outputs] if args.png_frames else []
        for folder in png_folders:
            if not folder.resolve().parent.exists():
                raise UserError(f"folder for --png-frames does not exist: {folder.parent}")
            check_frames_folder(folder)
        keep_audio = not (args.no_audio or video.is_image)
        if keep_audio and any(o.suffix.lower() == ".gif" for o in outputs) and _has_audio(input_path):
            print(f"infer.py: note: GIF holds no audio; {input_path.name}'s audio is not kept", file=sys.stderr)

        import jax.numpy as jnp

        from m3ddm_jax.outpaint.pipeline import OutpaintConfig, Outpainter
        from m3ddm_jax.weights import load_models

        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
        unet, vae = load_models(args.weights, args.vae, dtype=dtype)
        targets = [("ratio", r) for r in ratios] if ratios else [("pad", pad)]
        for (kind, value), out_path in zip(targets, outputs):
            cfg = OutpaintConfig(
                ratio=value if kind == "ratio" else None, pad=value if kind == "pad" else None,
                output_size=args.output_size, canvas=args.canvas, strides=strides, num_global_frames=args.global_frames,
                limit=args.limit, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance_scale,
                global_guidance_scale=args.global_guidance_scale, seed=args.seed, full_res=args.full_res,
                feather=args.feather,
            )
            t0 = time.perf_counter()
            fps = video.fps_fraction or video.fps
            # each output frame is encoded as soon as it is final; the files appear only when complete
            with VideoWriter(out_path, fps, audio_from=input_path if keep_audio else None, crf=args.crf,
                             lossless=args.lossless) as writer, contextlib.ExitStack() as stack:
                sinks = [writer.write]
                if png_folders:
                    sinks.append(stack.enter_context(PngFramesWriter(png_folders[outputs.index(out_path)])).write)
                result = Outpainter(unet, vae, cfg)(video, video.fps, progress=not args.quiet,
                                                    sink=lambda f: [s(f) for s in sinks])
            if result.copied:
                print(f"infer.py: {input_path.name} already has the target shape; writing a faithful copy", file=sys.stderr)
            print(f"{out_path}: {_summary(result, written_size(out_path))} (total {time.perf_counter() - t0:.1f} s)")
        return 0

    return run_main("infer.py", run)


if __name__ == "__main__":
    sys.exit(main())
