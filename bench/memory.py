#!/usr/bin/env python
"""Peak RSS of ``infer.py`` against video length (issue 11 item 4: flat memory in video length).

Generates 640x360 H.264 clips of N frames (cached under ``--cache``), runs ``infer.py`` on each in a
subprocess with the cheapest settings (``--weights tiny --steps 2 --output-size 64 --strides 15,5,1
--ratio 1:1``) and reads the child's peak RSS with ``os.wait4`` (its own ``ru_maxrss``). ``--repo`` picks
the checkout whose ``infer.py`` runs, so BEFORE/AFTER compare two commits:

    git worktree add /tmp/before <commit-before-the-change>
    python bench/memory.py --repo /tmp/before --label before --frames 300,3000
    python bench/memory.py --label after --frames 300,3000

Each run appends one JSON line to ``--out`` (default ``bench/memory_results.jsonl``) and prints a table
line; with two or more frame counts the ratio of the longest run's peak to the shortest's is printed
(goal: within 1.2x). Never run by CI.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_clip(path: Path, n: int, width: int = 640, height: int = 360, fps: int = 30) -> Path:
    """A moving-gradient H.264 clip of ``n`` frames (written once, then reused)."""
    import av  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    if path.exists():
        return path
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.mp4")
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "28"}
        for i in range(n):
            img = np.stack([(xx + 3 * i) % 256, (yy + 2 * i) % 256, (xx + yy + i) % 256], -1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)
    return path


def peak_rss_of(cmd: list[str], cwd: Path, log: Path) -> tuple[int, float, float]:
    """``(returncode, peak RSS MiB, seconds)`` of one child process."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), ru.ru_maxrss / 1024, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", default="300,3000", help="comma-separated frame counts (default 300,3000)")
    p.add_argument("--repo", default=str(REPO), help="checkout whose infer.py runs (default this one)")
    p.add_argument("--label", default=None, help="name of this measurement in the output (default the repo's commit)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "m3ddm_memory_clips"),
                   help="folder for the generated clips")
    p.add_argument("--out", default=str(REPO / "bench" / "memory_results.jsonl"), help="JSON lines appended here")
    p.add_argument("--extra", default="", help="extra infer.py arguments (space-separated), e.g. --full-res")
    args = p.parse_args(argv)

    repo = Path(args.repo).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    label = args.label or commit
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.frames.split(",") if x]
    rows = []
    for n in counts:
        clip = make_clip(cache / f"clip_{n}.mp4", n)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.mp4"
            cmd = [sys.executable, str(repo / "infer.py"), str(clip), "--weights", "tiny", "--steps", "2",
                   "--output-size", "64", "--strides", "15,5,1", "--ratio", "1:1", "--quiet", "--output", str(out),
                   *args.extra.split()]
            log = cache / f"log_{label}_{n}.txt"
            rc, mib, secs = peak_rss_of(cmd, repo, log)
        row = dict(label=label, commit=commit, frames=n, size="640x360", rc=rc, peak_rss_mib=round(mib, 1),
                   seconds=round(secs, 1), extra=args.extra, when=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{label:>8} {n:>6} frames 640x360: peak RSS {mib:8.1f} MiB, {secs:7.1f} s, rc {rc}"
              + ("" if rc == 0 else f" (log: {log})"), flush=True)
    ok = [r for r in rows if r["rc"] == 0]
    if len(ok) >= 2:
        lo, hi = min(ok, key=lambda r: r["frames"]), max(ok, key=lambda r: r["frames"])
        ratio = hi["peak_rss_mib"] / lo["peak_rss_mib"]
        print(f"{label}: {hi['frames']} vs {lo['frames']} frames: peak RSS x{ratio:.2f} (goal <= 1.2)")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
