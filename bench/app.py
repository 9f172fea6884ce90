#!/usr/bin/env python
"""The web demo's costs: start-up (process start to page served) and per-request overhead over the library.

    python bench/app.py                       # tiny weights, a generated 17-frame 72x128 (9:16) clip, 16:9, 2 steps, 64 px
    python bench/app.py --clip examples/sample_9x16.mp4 --repeat 5

Start-up: ``python app.py --weights W`` as a child process, timed until ``/`` answers 200 (the models are loaded
before the server starts, so this is the time to a usable page). Overhead: the same clip and settings through
the app's API (gradio_client: upload, checks, the run, the MP4 written and fetched back) against the plain
library call in this process (``M3DDMPipeline(...)`` + ``export_to_video``), both warm (the first request of
each pays the compile and is not counted), alternated request by request so both see the same machine load;
medians of ``--repeat`` pairs, and the fixed cost of a request that the checks refuse. Not run by CI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_clip(path: Path, n: int = 17, w: int = 72, h: int = 128, fps: int = 12) -> Path:
    from m3ddm_jax import VideoWriter

    yy, xx = np.mgrid[0:h, 0:w]
    with VideoWriter(path, fps) as writer:
        for i in range(n):
            f = np.stack([(xx * 3 + 7 * i) % 256, (yy * 2) % 256, 128 + 60 * np.sin((xx + yy + 3 * i) / 6.0)], -1)
            writer.write(f.astype(np.uint8))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(weights: str, log: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--weights", weights, "--port", str(port)],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.05)


def stop_app(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="tiny")
    ap.add_argument("--clip", default=None, help="input video (default: a generated 17-frame 72x128 clip)")
    ap.add_argument("--ratio", default="16:9")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--output-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--startups", type=int, default=2, help="app start-ups to time (default 2)")
    args = ap.parse_args()

    from gradio_client import Client, handle_file

    from m3ddm_jax import M3DDMPipeline, export_to_video

    work = Path(tempfile.mkdtemp(prefix="bench-app-"))
    clip = Path(args.clip) if args.clip else make_clip(work / "clip_9x16.mp4")
    settings = dict(ratio=args.ratio, num_inference_steps=args.steps, output_size=args.output_size, seed=6,
                    full_res=False, canvas="square")

    # start-up: process start -> page served (the last start-up stays up for the requests)
    startups = []
    for k in range(args.startups):
        proc, url, served = start_app(args.weights, work / f"app{k}.log")
        startups.append(served)
        if k < args.startups - 1:
            stop_app(proc)
    log = (work / f"app{args.startups - 1}.log").read_text()
    loaded = next((ln for ln in log.splitlines() if "models loaded" in ln), "")
    print(f"start-up (process start -> page served, --weights {args.weights}): "
          + ", ".join(f"{s:.1f} s" for s in startups) + f"  [{loaded.split(';')[0]}]", flush=True)

    pipe = M3DDMPipeline.from_pretrained(args.weights)

    def via_library():
        t = time.perf_counter()
        result = pipe(str(clip), progress=False, **settings)
        export_to_video(result, work / "lib_out.mp4")
        return time.perf_counter() - t

    try:
        client = Client(url, verbose=False)

        def via_app(ratio=args.ratio):
            t = time.perf_counter()
            out = client.predict(handle_file(str(clip)), ratio, "", 0, 0, 0, 0, args.output_size, args.steps, 6,
                                 False, False, api_name="/outpaint")
            took = time.perf_counter() - t
            want = "Done" if ratio != "Custom W:H" else "Error"
            if not str(out[0]).startswith(want):
                raise SystemExit(f"the app answered: {out[0]}")
            return took

        first_app, first_lib = via_app(), via_library()
        # alternated, so that both see the same machine load (a shared machine drifts over minutes)
        pairs = [(via_app(), via_library()) for _ in range(args.repeat)]
        # a request refused by the checks (empty custom ratio): the fixed cost of upload, queue and answer
        refused = [via_app("Custom W:H") for _ in range(args.repeat)]
    finally:
        stop_app(proc)
        shutil.rmtree(work, ignore_errors=True)

    app_times, lib_times = [a for a, _ in pairs], [b for _, b in pairs]
    med = statistics.median
    print(f"clip {clip.name}, {args.ratio}, {args.steps} steps, {args.output_size} px, {args.repeat} warm requests each, "
          f"alternated")
    print(f"  first request (compiles): app {first_app:.2f} s, library {first_lib:.2f} s")
    print(f"  app request (upload, checks, run, MP4 written and fetched): median {med(app_times):.3f} s "
          f"(min {min(app_times):.3f}, max {max(app_times):.3f})")
    print(f"  library call (pipe + export_to_video): median {med(lib_times):.3f} s "
          f"(min {min(lib_times):.3f}, max {max(lib_times):.3f})")
    print(f"  per-request overhead of the app: median of the pair differences {med(a - b for a, b in pairs):+.3f} s, "
          f"of the minima {min(app_times) - min(lib_times):+.3f} s")
    print(f"  a request refused by the checks (upload, queue, answer; no compute): median {med(refused):.3f} s")

if __name__ == "__main__":
    main()
