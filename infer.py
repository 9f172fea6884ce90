#!/usr/bin/env python
"""Outpaint a video (or an image) with M3DDM+; or many.

    python infer.py INPUT --ratio 16:9 --output OUT.mp4 [--weights W] [--seed N] [--pad ...]
                    [--output-size N] [--full-res] [--canvas tight] ...
    python infer.py CLIPS/ 'more/*.mov' a.mp4 --output-dir OUT [--overwrite] [--videos-per-call N] ...

Several ratios at once (``--ratio 16:9,1:1``) write one output each (``OUT_16-9.mp4``, ``OUT_1-1.mp4``).

Several inputs (files, folders: their videos and images, globs), or ``--output-dir``: one output per input and
ratio, ``<output-dir>/<input stem>_<W>-<H>.mp4`` (``_pad.mp4`` with ``--pad``; default folder: the current one).
Outputs that exist are skipped (a line says so) unless ``--overwrite``; an input that fails is one line on stderr,
the others are written, and the exit code is 1. Inputs with the same canvas shape share one compiled sampler and
are outpainted ``--videos-per-call`` at a time (:func:`m3ddm_jax.outpaint.batch.run_many`). ``--multihost``
splits the inputs over the processes of a ``jax.distributed`` run (input ``i`` to process ``i % n``).
"""
from __future__ import annotations

import contextlib
import glob
import sys
import time
from pathlib import Path

from m3ddm_jax.cli_common import OneLineParser, run_main
from m3ddm_jax.runtime import tune_malloc

tune_malloc()  # see m3ddm_jax/runtime.py: XLA CPU buffers without mmap page-fault storms
from m3ddm_jax.errors import UserError
from m3ddm_jax.outpaint.batch import DEFAULT_VIDEOS_PER_CALL, Job, process_share, run_many
from m3ddm_jax.weights import WEIGHTS_HELP


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="infer.py", description="M3DDM+ video outpainting (JAX).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="input video (mp4/mov/avi/webm/...) or image (png/jpg; treated as a 1-frame video); several "
                        "inputs, folders (their videos and images) or glob patterns ('clips/*.mp4') write one output "
                        "each (see --output-dir)")
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
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="several inputs: the folder for their outputs (created if missing; default the current "
                        "folder), named <input stem>_<W>-<H>.mp4 (_pad.mp4 with --pad); outputs that exist are skipped")
    p.add_argument("--overwrite", action="store_true", help="several inputs: write outputs that exist again")
    p.add_argument("--videos-per-call", type=int, default=DEFAULT_VIDEOS_PER_CALL, metavar="N",
                   help=f"several inputs: videos of one canvas shape outpainted together (default {DEFAULT_VIDEOS_PER_CALL})")
    p.add_argument("--multihost", action="store_true",
                   help="several inputs: one of several processes (jax.distributed: TPU pod slice, SLURM/MPI "
                        "auto-detected); the inputs are split over the processes")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="--multihost elsewhere: process 0's address (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="--multihost elsewhere: the number of processes")
    p.add_argument("--process-id", type=int, default=None, help="--multihost elsewhere: this process's index")
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
    p.add_argument("--guidance-rows", type=int, choices=(3, 4), default=3,
                   help="U-Net rows per window with both guidance scales > 1: 3 (uu, cu, cc; default) or 4 "
                        "(the reference's batch, whose uc row the guidance never reads)")
    p.add_argument("--schedule", choices=("waves", "sequential"), default="waves",
                   help="waves (default): windows that do not depend on each other run in one denoiser call; "
                        "sequential: one window at a time, in the reference's order")
    p.add_argument("--window-batch", type=int, default=0, metavar="N",
                   help="most windows per denoiser call (default 0: the local devices x what one holds)")
    p.add_argument("--devices", type=int, default=0, metavar="N",
                   help="local devices to use (default 0: all); the windows of a call are sharded over them")
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


def _expand_inputs(specs: list[str]) -> tuple[list[Path], list[str], bool]:
    """Files named by the INPUT arguments (a file; a folder: its videos and images, sorted; a glob pattern: its
    matches, sorted), without repeats; one-line problems (an empty folder, a pattern matching nothing); and
    whether the arguments name several inputs (a folder or a pattern always does)."""
    from m3ddm_jax.video import IMAGE_EXTS, VIDEO_EXTS

    files, problems, several = [], [], len(specs) > 1
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            several = True
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in VIDEO_EXTS | IMAGE_EXTS)
            if not found:
                problems.append(f"no videos or images in {path}")
            files += found
        elif not path.exists() and any(ch in spec for ch in "*?["):
            several = True
            found = sorted(Path(x) for x in glob.glob(spec) if Path(x).is_file() and not Path(x).name.startswith("."))
            if not found:
                problems.append(f"no file matches {spec}")
            files += found
        else:
            files.append(path)
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems, several


def _error_line(name, message: str) -> str:
    return f"infer.py: error: {message if str(name) in message else f'{name}: {message}'}"


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)

    def run() -> int:
        from m3ddm_jax.outpaint.geometry import make_geometry, parse_pad, parse_ratio
        from m3ddm_jax.outpaint.windows import parse_strides
        from m3ddm_jax.video import (PngFramesWriter, VideoReader, VideoWriter, check_frames_folder, check_writable,
                                     written_size)

        # cheap checks first: arguments, inputs, outputs; then weights; then compute
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
        if args.videos_per_call < 1:
            raise UserError(f"--videos-per-call must be at least 1, got {args.videos_per_call}")
        files, problems, several = _expand_inputs(args.inputs)
        batch = several or args.output_dir is not None
        if batch and args.output is not None:
            raise UserError("--output names one file; with several inputs give --output-dir (outputs are named "
                            "<input stem>_<W>-<H>.mp4 there)")
        if not batch and (args.multihost or args.overwrite):
            raise UserError(f"{'--multihost' if args.multihost else '--overwrite'} goes with several inputs or "
                            "--output-dir (one input with --output is always written)")
        if not args.multihost and any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
            raise UserError("--coordinator, --num-processes and --process-id need --multihost")
        targets = [("ratio", r) for r in ratios] if ratios else [("pad", pad)]
        suffixes = [r.replace(":", "-") for r in ratios] if ratios else ["pad"]
        index, count = 0, 1
        if args.multihost:  # before any other JAX call
            from m3ddm_jax.runtime import init_distributed

            index, count = init_distributed(args.coordinator, args.num_processes, args.process_id)

        # (input, target) -> output; what exists is skipped (batch) unless --overwrite
        failed = 0
        out_dir = None
        if batch:
            for line in problems if index == 0 else []:
                print(f"infer.py: error: {line}", file=sys.stderr)
                failed += 1
            out_dir = Path(args.output_dir) if args.output_dir is not None else Path.cwd()
            planned = {f.resolve(): [out_dir / f"{f.stem}_{s}.mp4" for s in suffixes] for f in files}
            all_outputs = {o.resolve() for outs in planned.values() for o in outs}
            outputs_of_run = [f for f in files if f.resolve() in all_outputs]  # a rerun into the input folder
            if outputs_of_run and index == 0:
                print(f"infer.py: note: not taken as inputs, being outputs of this run: "
                      f"{', '.join(f.name for f in outputs_of_run[:3])}{' ...' if len(outputs_of_run) > 3 else ''}")
            files = [f for f in files if f.resolve() not in all_outputs]
            files = process_share(files, index, count)
            owner = {}
            for f in files:  # two inputs must not write one output (clip.mp4 and clip.mov)
                for o in planned[f.resolve()]:
                    owner.setdefault(o.resolve(), f)
        else:
            input_path = Path(args.inputs[0])
            video = VideoReader(input_path)  # frames are decoded as a stream, twice: never all in memory
            planned = {input_path.resolve(): _outputs(args, input_path, ratios)}
            files, owner = [input_path], {}
        if batch and files:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                if args.png_frames:
                    Path(args.png_frames).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {e.filename}: {e.strerror or e}") from e

        ready = []  # (input, reader, target index, output, png folder or None, canvas shape)
        written = skipped = 0
        for f in files:
            outputs = planned[f.resolve()]
            clash = [o for o in outputs if owner.get(o.resolve(), f) != f]
            if clash:
                print(_error_line(f, f"its output {clash[0]} is also the output of {owner[clash[0].resolve()]}; "
                                     "rename one of them"), file=sys.stderr)
                failed += 1
                continue
            todo = []
            for t, o in enumerate(outputs):
                if batch and o.exists() and not args.overwrite:
                    print(f"skipped {o}: exists (--overwrite writes it again)")
                    skipped += 1
                else:
                    todo.append((t, o))
            if not todo:
                continue
            try:
                reader = VideoReader(f) if batch else video
                n_out = reader.num_frames if args.limit is None else max(0, min(args.limit, reader.num_frames))
                for t, o in todo:  # the extension decides the format: refused here, before any compute, if it cannot
                    check_writable(o, num_frames=n_out, lossless=args.lossless)
                    if o.resolve() == f.resolve():
                        raise UserError(f"output {o} would overwrite the input")
                    kind, value = targets[t]
                    g = make_geometry(reader.height, reader.width, ratio=value if kind == "ratio" else None,
                                      pad=value if kind == "pad" else None, output_size=args.output_size,
                                      canvas=args.canvas)
                    png = None
                    if args.png_frames:
                        png = Path(args.png_frames) / o.stem if batch else _png_folder(args.png_frames, o, len(outputs))
                        if not png.resolve().parent.exists():
                            raise UserError(f"folder for --png-frames does not exist: {png.parent}")
                        check_frames_folder(png)
                    ready.append((f, reader, t, o, png, (g.canvas_h, g.canvas_w)))
            except UserError as e:
                if not batch:
                    raise
                print(_error_line(f, str(e)), file=sys.stderr)
                failed += 1
                ready = [r for r in ready if r[0] is not f]
                continue
            keep_audio = not (args.no_audio or reader.is_image)
            if (keep_audio and any(o.suffix.lower() == ".gif" for _, o in todo) and _has_audio(f)):
                print(f"infer.py: note: GIF holds no audio; {f.name}'s audio is not kept", file=sys.stderr)

        if ready:
            import jax.numpy as jnp

            from m3ddm_jax.outpaint.pipeline import OutpaintConfig, Outpainter
            from m3ddm_jax.weights import load_models

            dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
            unet, vae = load_models(args.weights, args.vae, dtype=dtype)

            def job(f: Path, reader, out: Path, png: Path | None, shape) -> Job:
                keep_audio = not (args.no_audio or reader.is_image)

                @contextlib.contextmanager
                def sink():
                    # each output frame is encoded as soon as it is final; the files appear only when complete
                    with VideoWriter(out, reader.fps_fraction or reader.fps, audio_from=f if keep_audio else None,
                                     crf=args.crf, lossless=args.lossless) as writer, contextlib.ExitStack() as stack:
                        sinks = [writer.write]
                        if png is not None:
                            sinks.append(stack.enter_context(PngFramesWriter(png)).write)
                        yield lambda frame: [s(frame) for s in sinks]

                return Job(name=str(f), open=lambda: (reader, reader.fps), sink=sink,
                           done=(lambda: out.exists()) if batch and not args.overwrite else None, group=shape, data=out)

            def report(o) -> None:
                nonlocal written, skipped, failed
                f, out = o.job.name, o.job.data
                if o.status == "skipped":
                    print(f"skipped {out}: exists (--overwrite writes it again)")
                    skipped += 1
                elif o.status == "failed":
                    if not batch:
                        raise UserError(o.error)
                    print(_error_line(f, o.error), file=sys.stderr)
                    failed += 1
                else:
                    if o.result.copied:
                        print(f"infer.py: {Path(f).name} already has the target shape; writing a faithful copy",
                              file=sys.stderr)
                    shared = f" for {o.videos_in_call} videos in one call" if o.videos_in_call > 1 else ""
                    print(f"{out}: {_summary(o.result, written_size(out))} (total {o.seconds:.1f} s{shared})", flush=True)
                    written += 1

            for t, (kind, value) in enumerate(targets):
                jobs = []
                for f, reader, ti, out, png, shape in ready:
                    if ti == t:
                        jobs.append(job(f, reader, out, png, shape))
                if not jobs:
                    continue
                cfg = OutpaintConfig(
                    ratio=value if kind == "ratio" else None, pad=value if kind == "pad" else None,
                    output_size=args.output_size, canvas=args.canvas, strides=strides,
                    num_global_frames=args.global_frames, limit=args.limit, sampler=args.sampler, steps=args.steps,
                    guidance_scale=args.guidance_scale, global_guidance_scale=args.global_guidance_scale,
                    seed=args.seed, full_res=args.full_res, feather=args.feather,
                    guidance_rows=args.guidance_rows, schedule=args.schedule, window_batch=args.window_batch,
                    devices=args.devices,
                )
                run_many(Outpainter(unet, vae, cfg), jobs, videos_per_call=args.videos_per_call,
                         progress=not args.quiet, on_outcome=report)
        if batch:
            who = f"process {index} of {count}: " if count > 1 else ""
            print(f"infer.py: {who}{written} written, {skipped} skipped (exist), {failed} failed")
            if count > 1:
                from m3ddm_jax.runtime import barrier

                barrier("m3ddm_infer_done")  # process 0 hosts the coordinator: nobody leaves before the others
        return 1 if failed else 0

    return run_main("infer.py", run)


if __name__ == "__main__":
    sys.exit(main())
