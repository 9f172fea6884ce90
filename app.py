#!/usr/bin/env python
"""Web demo: outpaint a video (or an image) from the browser.

    pip install -e ".[demo]"
    python app.py [--weights W] [--port N] [--share] [--max-mb N] [--max-frames N] [--max-seconds S]

A Gradio page over the library's pipeline (:class:`m3ddm_jax.M3DDMPipeline`), never over the CLI: the model
is loaded once at start-up, each setting compiles once per canvas shape and stays warm for later requests,
and runs queue one at a time on the device. Uploads and results live in one temporary folder that is
pruned as results age (``--keep-minutes``) and removed on exit.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

from m3ddm_jax.cli_common import OneLineParser, run_main
from m3ddm_jax.runtime import tune_malloc

tune_malloc()  # see m3ddm_jax/runtime.py: XLA CPU buffers without mmap page-fault storms
from m3ddm_jax.errors import UserError  # noqa: E402
from m3ddm_jax.weights import WEIGHTS_HELP  # noqa: E402

PROG = "app.py"
RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "21:9")
CUSTOM = "Custom W:H"
PADDING = "Per-side padding"
TARGETS = (*RATIOS, CUSTOM, PADDING)
VIDEO_TYPES = [".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".gif"]
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"]
MIN_OUTPUT_SIDE = 16  # px: a ratio or padding whose output (or source frame inside it) is thinner is refused
MIN_FRAME_SIDE = 4
VIEW_H = 360  # px: height of the input and result players


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="M3DDM+ video outpainting in the browser (Gradio).")
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--vae", default=None, help="VAE folder or hub id (default: stable-diffusion-v1-5 vae, or weights/vae)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype of the models (default float32)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or $GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--max-mb", type=float, default=200, help="largest upload in MB (default 200; 0: no limit)")
    p.add_argument("--max-frames", type=int, default=600, help="longest video in frames (default 600; 0: no limit)")
    p.add_argument("--max-seconds", type=float, default=60, help="longest video in seconds (default 60; 0: no limit)")
    p.add_argument("--keep-minutes", type=float, default=60,
                   help="results and uploads older than this are deleted (default 60)")
    return p


class Cancelled(Exception):
    """Raised from the progress callable when the user pressed Cancel: the run stops at its window's end."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_mb: float = 200
    max_frames: int = 600
    max_seconds: float = 60


@dataclasses.dataclass
class Probe:
    """What the app knows about an upload after checking it."""

    path: Path
    is_image: bool
    num_frames: int
    width: int
    height: int
    fps: float

    def describe(self) -> str:
        if self.is_image:
            return f"image {self.width}x{self.height}"
        return (f"video {self.width}x{self.height}, {self.num_frames} frames at {self.fps:.3g} fps "
                f"({self.num_frames / self.fps:.1f} s)")


@dataclasses.dataclass
class Request:
    """One run's settings, as the page gives them."""

    target: str = "16:9"
    custom_ratio: str = ""
    pad: tuple = (0, 0, 0, 0)
    output_size: int = 256
    steps: int = 50
    seed: int = 6
    full_res: bool = False
    tight: bool = False


def format_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def progress_line(p) -> str:
    """One status line for a :class:`m3ddm_jax.outpaint.pipeline.Progress`."""
    eta = "estimating time left" if p.eta is None else f"about {format_seconds(p.eta)} left"
    return (f"Window {min(p.window + 1, p.windows)}/{p.windows}, step {p.step}/{p.total_steps}, "
            f"{format_seconds(p.elapsed)} elapsed, {eta}")


def cancelled_line(p) -> str:
    """Where a cancelled run stopped: the end of the window running when Cancel came (``p``: its Progress)."""
    if p is None:
        return "Cancelled before the run started"
    per_window = max(p.total_steps // max(p.windows, 1), 1)
    windows_done = -(-p.step // per_window)  # the window that held step p.step ran to its end
    return (f"Cancelled: stopped at the end of window {windows_done}/{p.windows} "
            f"({windows_done * per_window} of {p.total_steps} steps done)")


class Outpaint:
    """The demo's work, apart from the page: checks, one run at a time on the device, results on disk."""

    def __init__(self, pipe, workdir: Path, limits: Limits = Limits(), keep_seconds: float = 3600):
        self.pipe = pipe
        self.workdir = Path(workdir)
        self.results = self.workdir / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.keep_seconds = keep_seconds
        self.device = threading.Lock()  # one run on the device at a time, whatever the web server does
        self.jobs: dict[str, threading.Event] = {}
        self._jobs_lock = threading.Lock()

    # -- checks (cheap; before any compute) ----------------------------------------------------------
    def probe(self, path) -> Probe:
        from m3ddm_jax.video import VideoReader, is_image_path  # noqa: PLC0415

        if not path:
            raise UserError("upload a video or an image first")
        path = Path(path)
        lim = self.limits
        if not path.is_file():
            raise UserError(f"the upload {path.name} is gone (older than the keep time?); upload it again")
        size_mb = path.stat().st_size / 1e6
        if lim.max_mb and size_mb > lim.max_mb:
            raise UserError(f"{path.name} is {size_mb:.1f} MB; this demo takes files up to {lim.max_mb:g} MB")
        ext = path.suffix.lower()
        if ext not in VIDEO_TYPES and ext not in IMAGE_TYPES:
            raise UserError(f"{path.name}: not a video or an image this demo reads "
                            f"({' '.join(VIDEO_TYPES + IMAGE_TYPES)})")
        # one counting pass, stopped one frame past the limit
        reader = VideoReader(path, max_frames=lim.max_frames + 1 if lim.max_frames else None)
        if lim.max_frames and reader.num_frames > lim.max_frames:
            raise UserError(f"{path.name} has more than {lim.max_frames} frames; this demo takes videos up to "
                            f"{lim.max_frames} frames (trim it, or start the app with a larger --max-frames)")
        probe = Probe(path, is_image_path(path), reader.num_frames, reader.width, reader.height, reader.fps)
        seconds = probe.num_frames / probe.fps
        if not probe.is_image and lim.max_seconds and seconds > lim.max_seconds:
            raise UserError(f"{path.name} lasts {seconds:.1f} s; this demo takes videos up to {lim.max_seconds:g} s")
        return probe

    @staticmethod
    def target(req: Request) -> tuple[str | None, tuple | None]:
        """``(ratio, pad)`` for the page's target choice (one of them None)."""
        from m3ddm_jax.outpaint.geometry import parse_ratio  # noqa: PLC0415

        if req.target == PADDING:
            try:
                pad = tuple(int(round(float(v or 0))) for v in req.pad)
            except (TypeError, ValueError):
                raise UserError(f"padding must be whole numbers of pixels, got {req.pad}") from None
            if len(pad) != 4 or any(v < 0 for v in pad):
                raise UserError(f"padding must be four non-negative pixel counts, got {req.pad}")
            if not any(pad):
                raise UserError("padding is 0 on every side: nothing to outpaint; set at least one side")
            return None, pad
        ratio = (req.custom_ratio or "").strip() if req.target == CUSTOM else req.target
        if not ratio:
            raise UserError("type a ratio W:H (e.g. 2:1) in the custom ratio box")
        parse_ratio(ratio)  # ConfigError names the problem
        return ratio, None

    @staticmethod
    def check_geometry(probe: Probe, ratio, pad, req: Request):
        from m3ddm_jax.outpaint.geometry import make_geometry  # noqa: PLC0415

        if int(req.output_size) < 64:
            raise UserError(f"output size must be at least 64 pixels, got {req.output_size}")
        if int(req.steps) < 2:
            raise UserError(f"steps must be at least 2, got {req.steps}")
        g = make_geometry(probe.height, probe.width, ratio=ratio, pad=pad, output_size=int(req.output_size),
                          canvas="tight" if req.tight else "square")
        what = f"ratio {ratio}" if ratio else f"padding {pad}"
        if min(g.out_h, g.out_w) < MIN_OUTPUT_SIDE or min(g.frame_h, g.frame_w) < MIN_FRAME_SIDE:
            raise UserError(f"{what} on a {probe.width}x{probe.height} source gives a {g.out_w}x{g.out_h} output "
                            f"with the source {g.frame_w}x{g.frame_h} inside it at output size {req.output_size}: "
                            f"too thin to outpaint; choose a less extreme shape or a larger output size")
        return g

    # -- jobs: a Cancel button sets the job's event; the progress callable raises --------------------
    def new_job(self) -> str:
        job = uuid.uuid4().hex[:12]
        with self._jobs_lock:
            self.jobs[job] = threading.Event()
        return job

    def cancel(self, job: str | None) -> bool:
        with self._jobs_lock:
            ev = self.jobs.get(job or "")
        if ev is None:
            return False
        ev.set()
        return True

    def _event(self, job: str | None) -> tuple[str, threading.Event]:
        with self._jobs_lock:
            if job and job in self.jobs:
                return job, self.jobs[job]
        job = self.new_job()
        return job, self.jobs[job]

    def finish_job(self, job: str) -> None:
        with self._jobs_lock:
            self.jobs.pop(job, None)

    # -- housekeeping ---------------------------------------------------------------------------------
    def prune(self, now: float | None = None) -> int:
        """Delete result folders older than the keep time; returns how many went."""
        now = time.time() if now is None else now
        gone = 0
        for d in self.results.iterdir():
            try:
                if now - d.stat().st_mtime > self.keep_seconds:
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                    gone += 1
            except FileNotFoundError:
                pass
        return gone

    # -- one run -------------------------------------------------------------------------------------
    def run(self, path, req: Request, job: str | None = None, on_progress=None, on_start=None):
        """Outpaint the upload ``path`` with ``req``; returns ``(output path, summary line, probe)``.

        ``on_progress(Progress)`` is called after every denoising step; ``on_start()`` once the device is this
        run's. A cancelled job raises :class:`Cancelled` (at the end of the window running when Cancel came)."""
        from m3ddm_jax.video import VideoWriter, written_size  # noqa: PLC0415

        job, cancelled = self._event(job)
        probe = self.probe(path)
        ratio, pad = self.target(req)
        self.check_geometry(probe, ratio, pad, req)
        self.prune()
        out_dir = self.results / job
        out_dir.mkdir(parents=True, exist_ok=True)
        suffix = ratio.replace(":", "-") if ratio else "pad"
        out = out_dir / f"{probe.path.stem}_{suffix}{'.png' if probe.is_image else '.mp4'}"

        def progress(p):
            if cancelled.is_set():
                raise Cancelled(p)
            if on_progress is not None:
                on_progress(p)

        with self.device:
            if cancelled.is_set():
                raise Cancelled(None)
            if on_start is not None:
                on_start()
            from m3ddm_jax.video import VideoReader  # noqa: PLC0415

            source = VideoReader(probe.path)
            fps = source.fps_fraction or source.fps
            try:
                with VideoWriter(out, fps, audio_from=None if probe.is_image else source.path) as writer:
                    result = self.pipe(source, ratio=ratio, pad=pad, num_inference_steps=int(req.steps),
                                       progress=progress, sink=writer.write, output_size=int(req.output_size),
                                       seed=int(req.seed), full_res=bool(req.full_res),
                                       canvas="tight" if req.tight else "square")
            except BaseException:
                shutil.rmtree(out_dir, ignore_errors=True)
                raise
        summary = result.summary()
        rh, rw = result.shape[1:3]
        fw, fh = written_size(out)
        if (fw, fh) != (rw, rh):
            summary += f"; written {fw}x{fh} (H.264 needs even sizes)"
        if result.copied:
            summary += "; the input already has this shape"
        return out, summary, probe


# -- the page ----------------------------------------------------------------------------------------------

CSS = """
#status textarea { font-family: ui-monospace, monospace; }
"""


def build_demo(op: Outpaint, weights_name: str):
    import gradio as gr  # noqa: PLC0415

    tiny = str(weights_name).strip().lower() == "tiny"
    with gr.Blocks(title="M3DDM+ video outpainting", analytics_enabled=False,
                   delete_cache=(600, int(op.keep_seconds))) as demo:
        gr.Markdown("## M3DDM+ video outpainting\nUpload a video (or an image), pick the shape it should have, and "
                    "the model paints the missing sides. Frame count, frame rate and audio are kept."
                    + ("\n\n**Weights: `tiny`, a random test model: its output is noise.**" if tiny else ""))
        job = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                upload = gr.File(label="Video or image", file_types=VIDEO_TYPES + IMAGE_TYPES, elem_id="upload")
                target = gr.Radio(list(TARGETS), value="16:9", label="Target shape", elem_id="target")
                custom = gr.Textbox(label="Custom ratio W:H", placeholder="e.g. 2:1", visible=False,
                                    elem_id="custom-ratio")
                with gr.Row(visible=False) as pad_row:
                    pads = [gr.Number(value=0, precision=0, minimum=0, label=f"{side} (source px)", min_width=80,
                                      elem_id=f"pad-{side}") for side in ("left", "right", "top", "bottom")]
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    with gr.Row():
                        size = gr.Number(value=256, precision=0, minimum=64, label="Output size (long side, px)",
                                         min_width=100, elem_id="output-size")
                        steps = gr.Number(value=50, precision=0, minimum=2, maximum=1000, label="Denoising steps",
                                          min_width=100, elem_id="steps")
                        seed = gr.Number(value=6, precision=0, label="Seed", min_width=100, elem_id="seed")
                    full_res = gr.Checkbox(False, label="Full resolution (source pixels kept at source size)",
                                           elem_id="full-res")
                    tight = gr.Checkbox(False, label="Tight canvas (less compute, same output shape)",
                                        elem_id="tight")
                with gr.Row():
                    run_btn = gr.Button("Outpaint", variant="primary", elem_id="run")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Textbox(label="Status", value="Upload a video or an image.", interactive=False, lines=2,
                                    elem_id="status")
            with gr.Column(scale=3, min_width=320):
                with gr.Row(equal_height=True):
                    in_video = gr.Video(label="Input", interactive=False, height=VIEW_H, elem_id="input-video")
                    in_image = gr.Image(label="Input", interactive=False, visible=False, height=VIEW_H,
                                        elem_id="input-image")
                    out_video = gr.Video(label="Result", interactive=False, height=VIEW_H, elem_id="result-video")
                    out_image = gr.Image(label="Result", interactive=False, visible=False, height=VIEW_H,
                                         elem_id="result-image")
                summary = gr.Textbox(label="Summary", interactive=False, elem_id="summary")
                download = gr.File(label="Download", interactive=False, elem_id="download")

        def on_target(choice):
            return gr.update(visible=choice == CUSTOM), gr.update(visible=choice == PADDING)

        target.change(on_target, target, [custom, pad_row], queue=False, api_visibility="private")

        def on_upload(path):
            if not path:
                return gr.update(value=None, visible=True), gr.update(value=None, visible=False), "Upload a video or an image."
            try:
                probe = op.probe(path)
            except UserError as e:
                return (gr.update(value=None, visible=True), gr.update(value=None, visible=False),
                        f"Error: {e}")
            if probe.is_image:
                return gr.update(value=None, visible=False), gr.update(value=str(probe.path), visible=True), \
                    f"Ready: {probe.describe()}."
            return gr.update(value=str(probe.path), visible=True), gr.update(value=None, visible=False), \
                f"Ready: {probe.describe()}."

        upload.change(lambda: "Checking the upload…", None, status, queue=False, api_visibility="private").then(
            on_upload, upload, [in_video, in_image, status], concurrency_limit=4, concurrency_id="probe",
            api_visibility="private")

        def start():
            return op.new_job(), "Starting…"

        def outpaint(path, target_v, custom_v, left, right, top, bottom, size_v, steps_v, seed_v, full_v, tight_v,
                     job_v, progress=gr.Progress()):
            """Outpaint the upload; streams status lines, then the result."""
            job_v = job_v or op.new_job()  # an API call comes without the page's Run click
            req = Request(target_v, custom_v, (left, right, top, bottom), size_v or 0, steps_v or 0,
                          0 if seed_v is None else seed_v, bool(full_v), bool(tight_v))
            clear = (gr.update(value=None), gr.update(value=None), None, "")
            events: queue.Queue = queue.Queue()
            box: dict = {}

            def work():
                try:
                    box["out"] = op.run(path, req, job_v, on_progress=lambda p: events.put(("step", p)),
                                        on_start=lambda: events.put(("start", None)))
                except BaseException as e:  # noqa: BLE001  reported in the page below
                    box["error"] = e
                finally:
                    events.put(("done", None))

            yield ("Waiting for the device (one run at a time)…", *clear)
            t0 = time.perf_counter()
            worker = threading.Thread(target=work, name="outpaint", daemon=True)
            worker.start()
            shown = 0.0
            try:
                while True:
                    kind, p = events.get()
                    if kind == "done":
                        break
                    if kind == "start":
                        t0 = time.perf_counter()
                        yield ("Running: reading the video and encoding it (a new shape or setting also compiles "
                               "first; later runs reuse it)…", *clear)
                        continue
                    progress((p.step, p.total_steps), desc=progress_line(p), unit="steps")
                    now = time.perf_counter()
                    if now - shown > 0.25 or p.step == p.total_steps:
                        shown = now
                        yield (progress_line(p), *clear)
            finally:  # the page went away (or the server cancelled the event): stop the work too
                if worker.is_alive():
                    op.cancel(job_v)
                    worker.join()
                op.finish_job(job_v)
            err = box.get("error")
            if isinstance(err, Cancelled):
                yield (f"{cancelled_line(err.args[0] if err.args else None)}; nothing was written.", *clear)
                return
            if isinstance(err, UserError):
                yield (f"Error: {err}", *clear)
                return
            if err is not None:
                traceback.print_exception(err, file=sys.stderr)
                yield (f"Internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                       f"(details in the server log); the app keeps serving.", *clear)
                return
            out, line, probe = box["out"]
            video = gr.update(value=None if probe.is_image else str(out), visible=not probe.is_image)
            image = gr.update(value=str(out) if probe.is_image else None, visible=probe.is_image)
            yield (f"Done in {time.perf_counter() - t0:.1f} s: {line}", video, image, str(out), line)

        inputs = [upload, target, custom, *pads, size, steps, seed, full_res, tight, job]
        outputs = [status, out_video, out_image, download, summary]
        run_btn.click(start, None, [job, status], queue=False, api_visibility="private").then(
            outpaint, inputs, outputs, concurrency_limit=1, concurrency_id="device", api_name="outpaint",
            show_progress="minimal", show_progress_on=[out_video])

        def on_cancel(job_v):
            if op.cancel(job_v):
                return "Cancelling: the run stops at the end of the current window…"
            return gr.update()

        cancel_btn.click(on_cancel, job, status, queue=False, api_visibility="private")
    return demo


# -- process ----------------------------------------------------------------------------------------------

def make_workdir() -> Path:
    """The app's temporary folder (uploads under gradio/, results under results/), removed at exit."""
    workdir = Path(tempfile.mkdtemp(prefix="m3ddm-app-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    (workdir / "gradio").mkdir()
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")  # read when gradio is imported
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return workdir


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before the (slow) model load."""
    import socket  # noqa: PLC0415

    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port)") from None


def _interrupt(*_):
    """SIGTERM (a container or a test stopping the app) ends like Ctrl+C: the server closes, atexit cleans up."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        for name in ("max_mb", "max_seconds", "keep_minutes"):
            if getattr(args, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be non-negative")
        if args.max_frames < 0:
            raise UserError("--max-frames must be non-negative")
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("gradio") is None:
            raise UserError('the web demo needs Gradio: pip install -e ".[demo]"')
        if args.port is not None:
            _check_port(args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1", args.port)
        signal.signal(signal.SIGTERM, _interrupt)
        t0 = time.perf_counter()
        from m3ddm_jax import M3DDMPipeline  # noqa: PLC0415

        pipe = M3DDMPipeline.from_pretrained(args.weights, vae=args.vae, dtype=args.dtype)
        workdir = make_workdir()  # before gradio is imported: it reads GRADIO_TEMP_DIR then
        print(f"{PROG}: models loaded in {time.perf_counter() - t0:.1f} s; files in {workdir} (removed on exit)",
              flush=True)
        limits = Limits(args.max_mb, args.max_frames, args.max_seconds)
        op = Outpaint(pipe, workdir, limits, keep_seconds=args.keep_minutes * 60)
        demo = build_demo(op, args.weights or "m3ddm+")
        demo.queue(default_concurrency_limit=1)
        import gradio as gr  # noqa: PLC0415

        theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
        try:
            _, local_url, share_url = demo.launch(
                server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False, quiet=True,
                max_file_size=int(args.max_mb * 1e6) if args.max_mb else None, theme=theme, css=CSS, show_error=True,
                prevent_thread_lock=True)
        except OSError as e:  # port taken, bad host
            raise UserError(f"cannot serve: {str(e).splitlines()[0]}") from e
        print(f"{PROG}: serving {local_url}" + (f" and {share_url}" if share_url else "")
              + "; Ctrl+C stops", flush=True)
        demo.block_thread()
        return 0

    return run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
