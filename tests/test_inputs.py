"""Real-world inputs (issue 11, item 3): a corpus built here with PyAV, each input run through infer.py.

Rotated phone clips (display matrix 90/180/270) come out upright; variable frame rate, 10-bit (HEVC, AV1,
FFV1), VP9, 4:4:4, 4K, 1- and 2-frame videos work; an audio-only file and a zero-length file give one line on stderr
and exit 1, no traceback. The outcome of each input is printed as a table line (``pytest -s`` shows it).
Codecs this FFmpeg build cannot encode are reported as skipped in the table, not silently dropped.

infer.py runs in-process with the tiny models (2 steps, --output-size 64, --ratio 1:1): every input shares
one 64x64 canvas, so one compiled sampler serves the whole module.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m3ddm_jax.video import VideoReader, read_video
from tests import media
from tests.media import audio_only

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--steps", "2", "--output-size", "64", "--quiet"]


def pattern(n: int, h: int, w: int) -> np.ndarray:
    """Moving gradients with a white marker in the stored top-left corner (shows where a rotation put it)."""
    yy, xx = np.mgrid[0:h, 0:w]
    f = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        f[i, ..., 0] = (xx * 255 // max(w - 1, 1) + 7 * i) % 256
        f[i, ..., 1] = yy * 255 // max(h - 1, 1)
        f[i, ..., 2] = (100 + 50 * np.sin((xx + 2 * yy + 5 * i) / 5.0)).astype(np.uint8)
    f[:, : max(h // 6, 1), : max(w // 6, 1)] = 255
    return f


def encode(path: Path, frames: np.ndarray, codec: str = "libx264rgb", pix_fmt: str = "rgb24", fps: int = 24,
           options: dict | None = None, rotation: int | None = None, pts: list[int] | None = None,
           fmt: str | None = None) -> Path:
    return media.encode(path, frames, fps, codec, pix_fmt, options, rotation, pts, fmt)


VFR_MS = [0, 33, 50, 67, 117, 133, 200, 217, 233, 300]  # irregular gaps: 17..67 ms

# name -> (what, builder(dir) -> path, expected: frame count, or "error" for one line + exit 1)
CORPUS = {
    "rot90": ("H.264 RGB 48x32, display matrix +90", lambda d: encode(d / "rot90.mp4", pattern(5, 32, 48), rotation=90), 5),
    "rot180": ("H.264 RGB 48x32, display matrix 180", lambda d: encode(d / "rot180.mp4", pattern(5, 32, 48), rotation=180), 5),
    "rot270": ("H.264 RGB 48x32, display matrix -90 (a phone's portrait)",
               lambda d: encode(d / "rot270.mp4", pattern(5, 32, 48), rotation=-90), 5),
    "vfr": ("H.264 in MKV, irregular timestamps (VFR)",
            lambda d: encode(d / "vfr.mkv", pattern(10, 32, 48), pts=VFR_MS), 10),
    # libx265 corrupts the heap on frames smaller than its 64-px CTU (aborts in 5 of 6 runs): 96x64, single-threaded
    "hevc10": ("HEVC yuv420p10le (libx265)", lambda d: encode(d / "hevc10.mp4", pattern(4, 64, 96), "libx265",
                                                             "yuv420p10le", options={"x265-params": "log-level=none:pools=none:frame-threads=1"}), 4),
    "vp9": ("VP9 yuv420p (libvpx-vp9)", lambda d: encode(d / "vp9.webm", pattern(4, 32, 48), "libvpx-vp9", "yuv420p",
                                                        options={"deadline": "realtime", "cpu-used": "8"}), 4),
    # PyAV 18's libvpx has no high bit depth: reported as SKIPPED here, decoded where an encoder made the file
    "vp9_10": ("VP9 yuv420p10le (libvpx-vp9)", lambda d: encode(d / "vp9_10.webm", pattern(4, 32, 48), "libvpx-vp9",
                                                               "yuv420p10le", options={"deadline": "realtime"}), 4),
    "av1_10": ("AV1 yuv420p10le (libsvtav1; decoded by dav1d)",
               lambda d: encode(d / "av1_10.mkv", pattern(3, 64, 96), "libsvtav1", "yuv420p10le",
                                options={"preset": "12", "svtav1-params": "log-level=1"}), 3),
    "yuv444": ("H.264 yuv444p", lambda d: encode(d / "yuv444.mp4", pattern(4, 32, 48), "libx264", "yuv444p"), 4),
    "ffv1_10_444": ("FFV1 yuv444p10le", lambda d: encode(d / "ffv1.mkv", pattern(3, 32, 48), "ffv1", "yuv444p10le"), 3),
    "4k": ("H.264 3840x2160, 2 frames", lambda d: encode(d / "4k.mp4", pattern(2, 2160, 3840), "libx264", "yuv420p",
                                                        options={"preset": "ultrafast"}), 2),
    "one_frame": ("H.264, 1 frame", lambda d: encode(d / "one.mp4", pattern(1, 32, 48)), 1),
    "two_frames": ("H.264, 2 frames", lambda d: encode(d / "two.mp4", pattern(2, 32, 48)), 2),
    "audio_only": ("AAC audio, no video stream", lambda d: audio_only(d / "audio.m4a"), "error"),
    "empty": ("zero-length .mp4", lambda d: (d / "empty.mp4").write_bytes(b"") or d / "empty.mp4", "error"),
}


BUILDER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests import test_inputs as t
for name in sys.argv[3:]:
    print("START", name, flush=True)
    try:
        path = t.CORPUS[name][1](Path(sys.argv[2]))
        print("OK", name, path, flush=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        print("FAIL", name, f"{type(e).__name__}: {msg}", flush=True)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> path, or the reason the input could not be built here (an encoder this FFmpeg lacks). Each input
    is built in its own child process: an encoder that crashes (libx265 abort()s with a corrupted heap in a
    process that already ran other encoders, or one full of XLA threads) costs its own input only, never the
    test session or the other inputs."""
    d = tmp_path_factory.mktemp("corpus")
    out: dict[str, Path | str] = {}
    for name in CORPUS:
        r = subprocess.run([sys.executable, "-c", BUILDER, str(REPO), str(d), name],
                           capture_output=True, text=True, timeout=600)
        for line in r.stdout.splitlines():
            kind, got, *why = line.split(" ", 2)
            if kind == "OK":
                out[got] = Path(why[0])
            elif kind == "FAIL":
                out[got] = f"cannot build here: {why[0] if why else ''}"
        if name not in out:  # the builder died on this input
            last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            out[name] = f"cannot build here: encoder crashed: {last}"
    return out


@pytest.fixture(scope="module")
def infer_main():
    spec = importlib.util.spec_from_file_location("infer_inputs", REPO / "infer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def run_infer(infer_main, capsys, args):
    capsys.readouterr()
    rc = infer_main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("deg", [90, 180, -90])
def test_display_matrix_rotation_is_applied_on_read(corpus, deg):
    """The reader turns frames by the display matrix (counter-clockwise degrees, FFmpeg's convention): sizes are
    the upright ones before any frame is decoded, pixels equal the rotated source exactly (lossless clip)."""
    name = {90: "rot90", 180: "rot180", -90: "rot270"}[deg]
    src = pattern(5, 32, 48)
    want = np.rot90(src, deg // 90, axes=(1, 2))
    r = VideoReader(corpus[name])
    assert (r.num_frames, r.height, r.width, r.rotation) == (5, *want.shape[1:3], deg % 360)
    got = np.stack(list(r))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(read_video(corpus[name]).frames, want)  # the array path: the same reader
    if deg == -90:  # a phone's portrait clip (legacy tag rotate=90): turned clockwise, the corner goes top-right
        assert got.shape[1:3] == (48, 32) and (got[0, :4, -4:] == 255).all() and not (got[0, :4, :4] == 255).all()


def test_infer_turns_a_rotated_phone_clip_upright(corpus, infer_main, weights_dir, capsys, tmp_path):
    """End to end: a landscape-stored clip with a -90 display matrix is outpainted as the portrait video it shows;
    the kept region of the (lossless) output is the upright source at model resolution."""
    from m3ddm_jax.outpaint import canvas as cv
    from m3ddm_jax.outpaint.geometry import make_geometry

    out = tmp_path / "upright.mkv"
    rc, so, err = run_infer(infer_main, capsys, [str(corpus["rot270"]), "--ratio", "1:1", "--weights", str(weights_dir),
                                                 "--lossless", "--output", str(out), *ARGS])
    assert rc == 0, err
    assert "32x48 -> 64x64" in so  # the source is portrait (32 wide, 48 high)
    upright = np.rot90(pattern(5, 32, 48), -1, axes=(1, 2))
    g = make_geometry(48, 32, ratio="1:1", pad=None, output_size=64, canvas="square")
    fy, fx = g.frame_in_box
    res = read_video(out).frames
    np.testing.assert_array_equal(res[:, fy:fy + g.frame_h, fx:fx + g.frame_w],
                                  cv.resize_frames(upright, (g.frame_h, g.frame_w)))


def test_real_world_corpus_through_infer(corpus, infer_main, weights_dir, capsys, tmp_path):
    """Every corpus input either works (the output has the input's frame count) or gives exactly one line on
    stderr with exit 1 and no traceback; the outcome of each is printed as a table line."""
    lines, failures = [], []
    for name, (what, _, expected) in CORPUS.items():
        path = corpus[name]
        if isinstance(path, str):
            lines.append(f"{name:<12} {what:<55} SKIPPED ({path})")
            continue
        out = tmp_path / f"{name}_out.mp4"
        rc, so, err = run_infer(infer_main, capsys, [str(path), "--ratio", "1:1", "--weights", str(weights_dir),
                                                     "--output", str(out), *ARGS])
        err_lines = [ln for ln in err.splitlines() if ln.strip()]
        if rc == 0:
            n = read_video(out).num_frames
            outcome = f"ok: {so.strip().split(': ', 1)[-1]}"
            if expected == "error" or n != expected:
                failures.append(f"{name}: expected {expected}, wrote {n} frames")
        else:
            outcome = f"exit {rc}: {err.strip()}"
            if expected != "error" or rc != 1 or len(err_lines) != 1 or "Traceback" in err or out.exists():
                failures.append(f"{name}: {outcome!r}")
        lines.append(f"{name:<12} {what:<55} {outcome}")
    with capsys.disabled():
        print("\nreal-world inputs through infer.py (tiny model, --ratio 1:1, --output-size 64):")
        print("\n".join(lines))
    assert not failures, failures
    skipped = [ln for ln in lines if " SKIPPED " in ln]
    # PyAV 18's wheels encode all but 10-bit VP9; a skip elsewhere is reported in the table, not hidden
    assert len(skipped) <= 2 and all(ln.startswith(("vp9_10", "av1_10")) for ln in skipped), skipped


def test_vfr_clip_keeps_every_frame(corpus):
    """Irregular timestamps: every frame is read once, in order, at the container's average rate."""
    import av

    with av.open(str(corpus["vfr"])) as c:
        pts = [f.pts for f in c.decode(video=0)]
    gaps = np.diff(pts)
    assert gaps.min() != gaps.max()  # the corpus clip really is variable-rate
    r = VideoReader(corpus["vfr"])
    assert r.num_frames == len(VFR_MS) and r.fps > 0
    np.testing.assert_array_equal(np.stack(list(r)), pattern(len(VFR_MS), 32, 48))
