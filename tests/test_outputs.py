"""Outputs are what they claim and nothing is lost (issue 11, items 1, 2 and 7's infer part).

The extension decides the format (a real GIF; several frames into an image path refused before any compute),
the summary states the written file's size, files get the user's umask, audio keeps its codec and channel
layout (stream copy), a killed infer.py leaves no file under the output name and a full disk no partial file.

infer.py runs in-process through one module-scoped runner that shares the loaded tiny models and the compiled
sampler between runs (same config = same compiled loop); only the SIGKILL test needs a subprocess.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m3ddm_jax.video import read_video, write_video, written_size
from tests.media import Tone, encode, infer_in_process

REPO = Path(__file__).resolve().parents[1]
N, H, W = 9, 48, 27          # 9 frames of 27x48; --ratio 21:9 --output-size 64 -> 64x27: an odd height
INFER_ARGS = ["--ratio", "21:9", "--steps", "2", "--output-size", "64", "--quiet"]


def smooth_frames(n: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    f = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        f[i, ..., 0] = (xx * 255 // max(w - 1, 1) + 5 * i) % 256
        f[i, ..., 1] = yy * 255 // max(h - 1, 1)
        f[i, ..., 2] = (128 + 60 * np.sin((xx + yy + 3 * i) / 6.0)).astype(np.uint8)
    return f


def make_clip(path: Path, frames: np.ndarray, fps: int, layout: str | None = None, codec: str = "aac",
              audio_seconds: float | None = None, rate: int = 16000) -> Path:
    """A lossless clip with an optional tone track (``layout`` mono/stereo, ``codec``), longer than the video
    when ``audio_seconds`` says so."""
    tone = Tone(layout=layout, codec=codec, rate=rate, seconds=audio_seconds) if layout else None
    return encode(path, frames, fps, fmt="matroska" if path.suffix == ".mkv" else None, tone=tone)


def audio_info(path: Path, until: float | None = None):
    """(codec, layout, channels, [packet bytes], end time in s after the first video frame) of the first audio
    stream (Matroska shifts every stream by AAC's priming delay: times are measured from the video's start)."""
    import av

    with av.open(str(path)) as c:
        a, v = c.streams.audio[0], c.streams.video[0]
        v0 = float(v.start_time * v.time_base) if v.start_time is not None else 0.0
        packets, end = [], 0.0
        for p in c.demux(a):
            if p.dts is None or p.pts is None:
                continue
            if until is not None and p.pts * p.time_base - v0 >= until:
                break
            packets.append(bytes(p))
            end = max(end, float((p.pts + (p.duration or 0)) * p.time_base) - v0)
        return a.codec_context.name, a.codec_context.layout.name, a.codec_context.channels, packets, end


def dot_files(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if f.name.startswith("."))


# -- infer.py in-process, models and compiled sampler shared ---------------------------------------------------------

@pytest.fixture(scope="module")
def infer_run(weights_dir):
    """``run(*args) -> (rc, stdout, stderr)`` of infer.py's main in this process; ``run.loads`` counts model
    loads (0 for a run refused before any compute)."""
    with infer_in_process("infer_under_test") as run:
        yield run


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """9 frames of 27x48 at 24 fps with a mono AAC track."""
    return make_clip(tmp_path_factory.mktemp("clip") / "in.mp4", smooth_frames(N, H, W), 24, layout="mono")


@pytest.fixture(scope="module")
def mp4_run(infer_run, clip, weights_dir, tmp_path_factory):
    """One infer.py run to .mp4 under umask 027 with --png-frames: the output is 64x27, odd."""
    d = tmp_path_factory.mktemp("mp4")
    old = os.umask(0o027)
    try:
        rc, out, err = infer_run(clip, "--output", d / "out.mp4", "--weights", weights_dir, "--png-frames", d / "png",
                                 *INFER_ARGS)
    finally:
        os.umask(old)
    print(out, err)
    assert rc == 0, err
    return d, out, err


def test_odd_size_summary_states_the_written_size(mp4_run):
    d, out, _ = mp4_run
    assert written_size(d / "out.mp4") == (64, 26)  # yuv420p: the odd last row is cropped ...
    v = read_video(d / "out.mp4")
    assert v.frames.shape == (N, 26, 64, 3)
    line = out.strip().splitlines()[-1]
    assert "-> 64x26" in line and "64x27 cropped" in line  # ... and the summary says so, with the file's size
    assert "-> 64x27," not in line
    png = sorted((d / "png").glob("*.png"))
    assert len(png) == N and written_size(png[0]) == (64, 27)  # PNG frames keep the full size


def test_outputs_get_the_users_umask(mp4_run):
    d, _, _ = mp4_run
    assert (d / "out.mp4").stat().st_mode & 0o777 == 0o640  # umask 027 (mkstemp would give 0600)
    assert (d / "png").stat().st_mode & 0o777 == 0o750
    assert {f.stat().st_mode & 0o777 for f in (d / "png").iterdir()} == {0o640}
    assert dot_files(d) == []


def test_mono_audio_stays_mono_and_is_copied(mp4_run, clip):
    d, _, _ = mp4_run
    codec, layout, channels, packets, end = audio_info(d / "out.mp4")
    assert (codec, layout, channels) == ("aac", "mono", 1)
    src = audio_info(clip, until=N / 24)
    assert packets == src[3]  # the source's packets, byte for byte: a stream copy, no re-encoding
    assert end <= N / 24 + 1024 / 16000 + 1e-6  # trimmed to the video (to the packet)


def test_gif_is_a_real_gif(infer_run, clip, weights_dir, tmp_path):
    import av

    rc, out, err = infer_run(clip, "--output", tmp_path / "out.gif", "--weights", weights_dir,
                             "--png-frames", tmp_path / "png", *INFER_ARGS)
    assert rc == 0, err
    assert "GIF holds no audio" in err and len(err.strip().splitlines()) == 1
    with av.open(str(tmp_path / "out.gif")) as c:
        assert c.format.name == "gif" and c.streams.video[0].codec_context.name == "gif"
        assert [s.type for s in c.streams] == ["video"]
        got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert got.shape == (N, 27, 64, 3)  # every frame, odd size kept (no yuv420p)
    assert "-> 64x27," in out.strip().splitlines()[-1]
    import cv2

    ref = np.stack([cv2.imread(str(f))[:, :, ::-1] for f in sorted((tmp_path / "png").glob("*.png"))])

    def blur(x):  # dithering trades per-pixel error for local averages: compare 5x5 means
        return np.stack([cv2.blur(f.astype(np.float32), (5, 5)) for f in x])

    assert np.abs(blur(got) - blur(ref)).mean() < 4  # the same pictures, in 256 dithered colours


@pytest.mark.parametrize("name", ["out.png", "out.jpg", "out.avi", "out", "out.txt"])
def test_video_into_an_image_or_unknown_path_is_refused_before_compute(infer_run, clip, weights_dir, tmp_path, name):
    loads = infer_run.loads
    rc, out, err = infer_run(clip, "--output", tmp_path / name, "--weights", weights_dir, *INFER_ARGS)
    lines = err.strip().splitlines()
    print(lines)
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("infer.py: error: output")
    if name in ("out.png", "out.jpg"):
        assert f"{N} frames" in lines[0] and "--png-frames" in lines[0]
    else:
        assert "the extension decides the format" in lines[0] and ".mp4" in lines[0]
    assert infer_run.loads == loads  # refused before the models were even loaded
    assert list(tmp_path.iterdir()) == []


def test_one_frame_into_an_image_path_and_video_into_numbered_pngs(tmp_path):
    frames = smooth_frames(3, 20, 30)
    write_video(tmp_path / "one.png", frames[:1], 24)
    assert read_video(tmp_path / "one.png").frames.tolist() == frames[:1].tolist()  # PNG: exact
    from m3ddm_jax.errors import UserError
    from m3ddm_jax.video import write_frames_png

    with pytest.raises(UserError, match="single image but the result has 3 frames"):
        write_video(tmp_path / "many.png", frames, 24)
    assert not (tmp_path / "many.png").exists()
    write_frames_png(tmp_path / "frames", frames)
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == 3
    write_frames_png(tmp_path / "frames", frames[:2])  # earlier frames are replaced as a whole
    assert sorted(f.name for f in (tmp_path / "frames").iterdir()) == ["frame_00000.png", "frame_00001.png"]
    (tmp_path / "frames" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="holds other files"):  # never deletes what is not ours
        write_frames_png(tmp_path / "frames", frames)
    assert (tmp_path / "frames" / "mine.txt").read_text() == "keep" and dot_files(tmp_path) == []


# -- audio: layout and codec kept ---------------------------------------------------------------------------------

@pytest.mark.parametrize("src_ext, layout, codec, out_ext, want_codec, copied", [
    (".mp4", "stereo", "aac", ".mp4", "aac", True),
    (".mp4", "mono", "aac", ".mkv", "aac", True),
    (".mkv", "stereo", "libopus", ".webm", "opus", True),
    (".mp4", "mono", "aac", ".webm", "opus", False),      # WebM cannot hold AAC: re-encoded, still mono
    (".mkv", "stereo", "flac", ".mp4", "aac", False),     # MP4 here takes no FLAC: re-encoded, still stereo
])
def test_audio_keeps_layout_and_codec(tmp_path, src_ext, layout, codec, out_ext, want_codec, copied):
    rate = 48000 if codec == "libopus" else 16000
    src = make_clip(tmp_path / f"src{src_ext}", smooth_frames(12, 32, 32), 24, layout=layout, codec=codec,
                    audio_seconds=2.0, rate=rate)  # the audio runs 1.5 s past the video
    out = write_video(tmp_path / f"out{out_ext}", read_video(src).frames, 24, audio_from=src)
    got_codec, got_layout, channels, packets, end = audio_info(out)
    assert (got_codec, got_layout, channels) == (want_codec, layout, 1 if layout == "mono" else 2)
    if copied:
        assert packets == audio_info(src, until=0.5)[3]  # byte-identical packets: no re-encoding
    assert 0.4 < end <= 0.5 + 0.07  # trimmed to the video's 0.5 s (a copy: to the packet)


# -- faults: SIGKILL mid-write, a full disk --------------------------------------------------------------------------

KILL_WRAPPER = r"""
import runpy, sys, time
import av
real_open = av.open

class PauseAfterThreePackets:  # the output container, paused for good mid-write
    def __init__(self, c):
        self._c, self._n = c, 0
    def __getattr__(self, k):
        return getattr(self._c, k)
    def __enter__(self):
        self._c.__enter__()
        return self
    def __exit__(self, *a):
        return self._c.__exit__(*a)
    def mux(self, packet):
        self._c.mux(packet)
        self._n += 1
        if self._n == 3:
            print("WRITING", flush=True)
            time.sleep(3600)

def opener(path, mode="r", *a, **k):
    c = real_open(path, mode, *a, **k)
    return PauseAfterThreePackets(c) if mode == "w" else c

av.open = opener
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_mid_write_leaves_no_output_and_the_rerun_cleans_up(infer_run, clip, weights_dir, tmp_path):
    out = tmp_path / "out.mp4"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.Popen([sys.executable, "-c", KILL_WRAPPER, str(REPO / "infer.py"), str(clip), "--output", str(out),
                          "--weights", str(weights_dir), *INFER_ARGS], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env=env)
    try:
        line = p.stdout.readline()  # blocks until the writer is paused mid-file (or the run ended)
        assert line.startswith("WRITING"), line
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert not out.exists()  # nothing under the output name
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.mp4.partial-")  # only the dead run's dot-named temporary
    rc, _, err = infer_run(clip, "--output", out, "--weights", weights_dir, *INFER_ARGS)
    assert rc == 0, err
    assert os.listdir(tmp_path) == ["out.mp4"]  # the rerun removed the dead run's temporary
    assert read_video(out).num_frames == N


FULL_DISK = r"""
import resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from m3ddm_jax.cli_common import run_main
from m3ddm_jax.video import write_video
frames = np.random.default_rng(0).integers(0, 256, (24, 128, 128, 3), dtype=np.uint8)  # noise: ~1 MB lossless
sys.exit(run_main("write", lambda: write_video(sys.argv[1], frames, 24, lossless=True) and 0))
"""


@pytest.mark.parametrize("ext", [".mp4", ".png"])
def test_full_disk_leaves_no_partial_file_and_the_old_output(tmp_path, ext):
    dest = tmp_path / f"out{ext}"
    dest.write_bytes(b"an earlier result")
    script = FULL_DISK if ext == ".mp4" else FULL_DISK.replace("(24, 128, 128, 3)", "(1, 512, 512, 3)")
    p = subprocess.run([sys.executable, "-c", script, str(dest)], capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    print(p.stderr)
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr
    assert lines[0].startswith(f"write: error: cannot write {dest}") and "File too large" in lines[0]
    assert dest.read_bytes() == b"an earlier result" and dot_files(tmp_path) == []


ENOSPC = r"""
import json, sys
from pathlib import Path
import numpy as np
from m3ddm_jax.cli_common import run_main
from m3ddm_jax.video import write_video
disk, ext = Path(sys.argv[1]), sys.argv[2]
dest = disk / f"out{ext}"
dest.write_bytes(b"an earlier result")
(disk / "filler").write_bytes(bytes(200_000))              # of 256 KiB: the next ~56 KiB fill the disk
frames = np.random.default_rng(0).integers(0, 256, (24, 128, 128, 3), dtype=np.uint8)
rc = run_main("write", lambda: write_video(dest, frames, 24, lossless=ext != ".webm") and 0)
print(json.dumps({"rc": rc, "dest": dest.read_text(), "files": sorted(p.name for p in disk.iterdir())}))
"""


def user_namespace_tmpfs(tmp_path: Path) -> bool:
    """Whether a small tmpfs can be mounted without root here (a user + mount namespace)."""
    import shutil

    (tmp_path / "probe").mkdir()
    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path / 'probe'}"],
        capture_output=True).returncode == 0


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".webm"])
def test_real_full_disk_leaves_no_partial_file_and_the_old_output(tmp_path, ext):
    """ENOSPC for real: a 256 KiB tmpfs in a user namespace (skipped where unshare cannot mount one). Unlike a
    file-size limit, a full disk can also surface at the container's trailer and at close."""
    import json

    if not user_namespace_tmpfs(tmp_path):
        pytest.skip("no user-namespace tmpfs here (unshare -rm + mount); the RLIMIT_FSIZE test covers this")
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = (f"mount -t tmpfs -o size=256k tmpfs {disk} && cd {REPO} && "
           f"{sys.executable} -c \"$0\" {disk} {ext}")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", cmd, ENOSPC], capture_output=True, text=True, timeout=300)
    print(p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["rc"] == 1 and len(lines) == 1 and "Traceback" not in p.stderr
    assert lines[0] == f"write: error: cannot write {disk / f'out{ext}'}: No space left on device"
    assert got["dest"] == "an earlier result" and got["files"] == ["filler", f"out{ext}"]  # no temporary left
