"""Benchmark the grain video loader (not run by CI): training clips per second per worker process.

Writes real H.264 files (PyAV, libx264, yuv420p, moving textured content so the decoder does real work)
into a temporary folder and times the training loader of ``m3ddm_jax.data.video_folder`` on them at the
paper's sizes: 16-frame clips cropped to 128 px and 16 global frames resized to 128 px per element.

    python bench/data.py                                   # 360p, 10 s at 30 fps (WebVid-like), 1 worker
    python bench/data.py --height 720 --width 1280 --seconds 10 --workers 0,1,2
    python bench/data.py --seconds 60 --gop 60                # longer videos, a keyframe every 2 s

Measured:

* ``element``: ``load_clip`` in this process (what one grain worker does per element: open, decode up to
  the last global frame, crop, resize), per clip, wall and CPU seconds (CPU seconds give the rate of one
  worker with a core to itself; wall seconds include whatever else shares the machine);
* ``with data.cache_dir``: the same after each video's index was written (its first visit is timed too):
  the global frames come from the index and only the clip is decoded, from the keyframe before it;
* ``loader, N workers``: the grain ``DataLoader`` (batch 8, ``worker_count`` N) end to end, clips/s.

Every global frame is spread over the whole video, so one element decodes the video up to its last frame:
the cost is per *video length*, not per clip length. The machine's load average is printed with the
result (this benchmark shares its CPUs with whatever else runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_h264(path: Path, frames: int, height: int, width: int, fps: int, seed: int, gop: int | None = None) -> None:
    """A moving textured video (noise texture panned + a moving bright disk), H.264 crf 23; ``gop``: the
    keyframe interval (None: x264's default, 250)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 256, (height * 2, width * 2, 3), dtype=np.uint8)
    tex = (tex.astype(np.float32) * 0.5 + 64).astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"crf": "23", "preset": "veryfast", **({"g": str(gop)} if gop else {})}
        for i in range(frames):
            dy, dx = (3 * i) % height, (5 * i) % width
            img = tex[dy:dy + height, dx:dx + width].copy()
            cy, cx = height / 2 + height / 3 * np.sin(i / 10), width / 2 + width / 3 * np.cos(i / 13)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (height / 6) ** 2] = (230, 200, 40)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--size", type=int, default=128, help="clip crop size (the paper: 128)")
    ap.add_argument("--global-size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--global-frames", type=int, default=16)
    ap.add_argument("--elements", type=int, default=16, help="clips timed per measurement")
    ap.add_argument("--workers", default="0,1", help="grain worker counts to time the DataLoader with")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gop", type=int, default=None, help="keyframe interval of the written videos (x264: 250)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import numpy as np

    from m3ddm_jax.data.video_folder import ClipSpec, find_videos, load_clip, make_loader
    from m3ddm_jax.runtime import tune_malloc

    tune_malloc()
    from absl import flags  # grain worker processes read absl flags

    flags.FLAGS.mark_as_parsed()
    spec = ClipSpec(num_frames=args.frames, num_global_frames=args.global_frames, size=args.size,
                    global_size=args.global_size)
    out: dict = {"video": f"{args.width}x{args.height} H.264, {args.seconds:g} s at {args.fps} fps",
                 "clip": f"{args.frames} frames at {args.size} px + {args.global_frames} global frames at "
                         f"{args.global_size} px", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        n_frames = int(round(args.seconds * args.fps))
        t = time.perf_counter()
        for i in range(args.videos):
            write_h264(Path(tmp) / f"v{i:03d}.mp4", n_frames, args.height, args.width, args.fps, i, args.gop)
        out["write_s"] = round(time.perf_counter() - t, 1)
        files = find_videos(tmp)
        rng = np.random.default_rng(0)
        load_clip(files[0], spec, rng)  # warm-up (imports, codec init)
        rows = {}
        indexed = dataclasses.replace(spec, cache_dir=str(Path(tmp) / "idx"))
        for label, sp in (("plain", spec), ("index", indexed)):
            if label == "index":  # first visits: decode as before and write each video's index
                t, c = time.perf_counter(), time.process_time()
                for f in files:
                    load_clip(f, sp, rng)
                out["index_first_visit_cpu_s_per_video"] = round((time.process_time() - c) / len(files), 4)
                out["index_bytes_per_video"] = sum(p.stat().st_size for p in (Path(tmp) / "idx").glob("*.npz")) // len(files)
            times, cpu = [], []
            for i in range(args.elements):
                t, c = time.perf_counter(), time.process_time()
                el = load_clip(files[i % len(files)], sp, rng)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            assert el["frames"].shape == (args.frames, args.size, args.size, 3)
            assert el["global_frames"].shape == (args.global_frames, args.global_size, args.global_size, 3)
            rows[label] = (statistics.median(times), statistics.median(cpu))
        med, cpu_med = rows["plain"]
        out["element_s_median"] = round(med, 4)
        out["clips_per_s_per_worker"] = round(1.0 / med, 2)
        out["element_cpu_s_median"] = round(cpu_med, 4)
        out["clips_per_cpu_s"] = round(1.0 / cpu_med, 2)
        print(f"{out['video']}; {out['clip']}: load_clip median {med * 1e3:.0f} ms wall, {cpu_med * 1e3:.0f} ms "
              f"CPU -> {1 / med:.2f} clips/s per worker process here, {1 / cpu_med:.2f} per busy core", flush=True)
        med, cpu_med = rows["index"]
        out["index_element_s_median"] = round(med, 4)
        out["index_element_cpu_s_median"] = round(cpu_med, 4)
        out["index_clips_per_cpu_s"] = round(1.0 / cpu_med, 2)
        print(f"with data.cache_dir (each video's index written on its first visit: "
              f"{out['index_first_visit_cpu_s_per_video'] * 1e3:.0f} ms CPU, {out['index_bytes_per_video'] / 1e3:.0f} KB "
              f"per video): load_clip median {med * 1e3:.0f} ms wall, {cpu_med * 1e3:.0f} ms CPU -> "
              f"{1 / cpu_med:.2f} clips/s per busy core", flush=True)
        for w in [int(x) for x in args.workers.split(",") if x.strip()]:
            for label, sp in (("", spec), ("_index", indexed)):
                it = iter(make_loader(files, sp, batch_size=args.batch, seed=0, worker_count=w))
                next(it)  # start-up (worker processes, first batch)
                n = max(1, args.elements // args.batch)
                t = time.perf_counter()
                for _ in range(n):
                    next(it)
                cps = n * args.batch / (time.perf_counter() - t)
                out[f"loader{label}_clips_per_s_{w}_workers"] = round(cps, 2)
                print(f"grain DataLoader{' with the index' if label else ''}, batch {args.batch}, {w} worker(s): "
                      f"{cps:.2f} clips/s", flush=True)
                del it
    out["load_average"] = [round(x, 1) for x in os.getloadavg()]
    print(f"load average during the run: {out['load_average']} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
