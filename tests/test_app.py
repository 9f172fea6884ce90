"""The web demo (``app.py``) in a real headless browser.

The app runs as a child process on a free localhost port with the tiny weights; Debian's Chromium, driven by
Playwright with the system browser, uploads a generated 9:16 clip (with an audio track), asks for 16:9 with
2 steps at a 64-px output, cancels a first run (it stops at its window's end and writes nothing), runs again,
downloads the MP4 and checks frame count, frame rate, aspect and audio; then a text file renamed ``.mp4``, a
clip over ``--max-frames``, a file over ``--max-mb`` and an impossible ratio each show their message in the
page, and a last run still succeeds. A screenshot of the finished page goes to ``tmp_path`` (to ``docs/demo.png`` with
``M3DDM_UPDATE_SCREENSHOT=1``). Skipped only when Chromium, Playwright or Gradio (the ``demo`` extra) is not
installed; CI installs all three.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tests.media import Tone, encode

REPO = Path(__file__).resolve().parents[1]
N_FRAMES, W, H, FPS = 17, 72, 128, 12  # 9:16
MAX_FRAMES = 40                         # the app's --max-frames in this test
MAX_MB = 1.5                            # and its --max-mb


def chromium_path() -> str | None:
    for name in (os.environ.get("M3DDM_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def make_clip(path: Path, n: int, fps: int = FPS, audio: bool = True) -> Path:
    """A 9:16 H.264 clip (yuv420p: the browser plays it) with a mono AAC tone as long as the video."""
    yy, xx = np.mgrid[0:H, 0:W]
    frames = np.stack([np.stack([(xx * 3 + 7 * i) % 256, (yy * 2) % 256, 128 + 60 * np.sin((xx + yy + 3 * i) / 6.0)],
                                -1).astype(np.uint8) for i in range(n)])
    return encode(path, frames, fps, "libx264", options={}, tone=Tone() if audio else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """``python app.py --weights tiny`` as a child process; its output goes to a log file."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--weights", "tiny", "--port", str(self.port),
             "--max-frames", str(MAX_FRAMES), "--max-mb", str(MAX_MB)],
            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_served(self, timeout: float = 180) -> float:
        """Seconds from process start to the page answering 200."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"app.py exited with {self.proc.returncode} before serving:\n{self.text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(0.25)
        pytest.fail(f"app.py did not serve {self.url} within {timeout} s:\n{self.text()[-3000:]}")

    def workdir(self) -> Path:
        m = re.search(r"files in (\S+) \(removed on exit\)", self.text())
        assert m, self.text()[-2000:]
        return Path(m.group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def need_gradio() -> None:
    if importlib.util.find_spec("gradio") is None:  # README's and CI's test command install it
        pytest.skip('Gradio is not installed: the web demo is the extra pip install -e ".[demo]"')


@pytest.fixture(scope="module")
def browser_kit():
    chromium = chromium_path()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip('Playwright for Python is not installed (pip install -e ".[test]"); .ci/run installs it')
    need_gradio()
    return chromium


def status(page) -> str:
    return page.input_value("#status textarea")


def wait_status(page, app: App, pattern: str, timeout: float = 120) -> str:
    """Wait until the status box matches ``pattern`` (a regex); its text."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = status(page)
        if re.search(pattern, text):
            return text
        if app.proc.poll() is not None:
            pytest.fail(f"app.py died (exit {app.proc.returncode}); status {text!r}\n{app.text()[-3000:]}")
        page.wait_for_timeout(100)
    pytest.fail(f"status never matched {pattern!r} in {timeout} s; it says {status(page)!r}\n{app.text()[-3000:]}")


def clear_status(page) -> None:
    """Blank the status box in the DOM only: the app's next status line (every click sets a new one) shows
    again even when it repeats the previous text, so a wait never reads the previous request's line."""
    page.evaluate("document.querySelector('#status textarea').value = ''")


def upload(page, path: Path, timeout: float = 30) -> None:
    """Put ``path`` into the upload box, clearing the file already there as a user would.

    The box holds a file exactly when its drop zone (the file input) is gone; Clear brings the drop zone back.
    The state is read again each time round, never assumed: after an upload Gradio refused (over --max-mb) it
    re-renders, and a Clear button counted a moment ago may be gone, or lie stale under the drop zone."""
    clear = page.locator("#upload button[aria-label=Clear]")
    file_input = page.locator("#upload input[type=file]")
    end = time.monotonic() + timeout
    while not file_input.count():
        if time.monotonic() > end:
            pytest.fail(f"the upload box never offered its drop zone in {timeout} s (Clear buttons: {clear.count()})")
        if clear.count():
            try:
                clear.first.click(timeout=1_000)
            except Exception:  # noqa: BLE001  Playwright's TimeoutError: detached or re-rendered; look again
                pass
        page.wait_for_timeout(100)
    clear_status(page)
    file_input.first.set_input_files(str(path))


def set_number(page, elem_id: str, value) -> None:
    """Type ``value`` into a number box and make sure the app took it (Gradio may re-render the box while a
    status update streams in, dropping a value typed at that moment)."""
    box = page.locator(f"#{elem_id} input").first
    for _ in range(20):
        box.fill(str(value))
        box.press("Tab")
        page.wait_for_timeout(300)
        if box.input_value() == str(value):
            page.wait_for_timeout(300)
            if box.input_value() == str(value):
                return
    pytest.fail(f"the {elem_id} box kept {box.input_value()!r}, not {value!r}")


def run_and_wait(page, app: App, timeout: float = 150) -> str:
    clear_status(page)
    page.click("#run")
    return wait_status(page, app, r"^(Done|Error|Internal error|Cancelled)", timeout)


def save_screenshot(page, tmp_path: Path) -> Path:
    """The finished page as PNG: into tmp_path, or (M3DDM_UPDATE_SCREENSHOT=1) README's docs/demo.png, reduced to
    a 128-colour palette to keep the repository small."""
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("M3DDM_UPDATE_SCREENSHOT") == "1":
        from PIL import Image

        dest = REPO / "docs" / "demo.png"
        dest.parent.mkdir(exist_ok=True)
        Image.open(shot).convert("RGB").quantize(colors=128).save(dest, optimize=True)
        print(f"screenshot: {dest} ({dest.stat().st_size // 1024} KiB)")
    return shot


def test_app_in_browser(browser_kit, tmp_path):
    from playwright.sync_api import sync_playwright

    import av

    clip = make_clip(tmp_path / "clip_9x16.mp4", N_FRAMES)
    long_clip = make_clip(tmp_path / "long_clip.mp4", MAX_FRAMES + 1, audio=False)
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("these are notes, not a video\n" * 20)
    too_big = tmp_path / "too_big.mp4"
    too_big.write_bytes(clip.read_bytes() + bytes(int(MAX_MB * 1e6)))

    app = App(tmp_path / "app.log")
    try:
        served = app.wait_served()
        print(f"app.py: page served {served:.1f} s after process start")
        workdir = app.workdir()
        assert workdir.is_dir()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_kit, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860}, accept_downloads=True)
                page.goto(app.url)
                page.wait_for_selector("#run", timeout=60_000)
                assert "tiny" in page.inner_text("body")  # the page says its output is noise

                upload(page, clip)
                ready = wait_status(page, app, r"^(Ready|Error)", 60)
                assert ready == f"Ready: video {W}x{H}, {N_FRAMES} frames at {FPS} fps ({N_FRAMES / FPS:.1f} s).", ready
                page.get_by_label("16:9", exact=True).check()
                page.click("#advanced button, #advanced .label-wrap")
                set_number(page, "output-size", 64)
                set_number(page, "steps", 2)

                # 1) Cancel while the first run compiles: it stops at the end of window 1 of 2, nothing written
                clear_status(page)
                page.click("#run")
                wait_status(page, app, r"^Running", 120)
                page.click("#cancel")
                text = wait_status(page, app, r"^(Done|Error|Internal error|Cancelled:)", 150)
                assert text == "Cancelled: stopped at the end of window 1/2 (2 of 4 steps done); nothing was written.", text
                assert not [p for p in (workdir / "results").rglob("*") if p.is_file()], "a cancelled run wrote files"
                assert page.locator("#download a").count() == 0

                # 2) the run: result beside the input, summary, download
                t = time.perf_counter()
                text = run_and_wait(page, app)
                took = time.perf_counter() - t
                assert text.startswith("Done"), text
                summary = page.input_value("#summary textarea")
                assert summary.startswith(f"{N_FRAMES} frames {W}x{H} -> 64x36, 2 windows x 2 steps"), summary
                assert summary in text
                page.wait_for_function("document.querySelector('#result-video video')?.readyState >= 1",
                                       timeout=30_000)
                duration = page.evaluate("document.querySelector('#result-video video').duration")
                assert abs(duration - N_FRAMES / FPS) < 0.2, duration  # the browser decodes the result
                with page.expect_download(timeout=30_000) as dl:
                    page.locator("#download a").first.click()
                got = tmp_path / "download.mp4"
                dl.value.save_as(got)
                with av.open(str(got)) as c:
                    vs = c.streams.video[0]
                    n = sum(1 for _ in c.decode(vs))
                    fps, (w, h) = vs.average_rate, (vs.codec_context.width, vs.codec_context.height)
                    audio = [s.codec_context.name for s in c.streams.audio]
                print(f"download: {n} frames {w}x{h} at {fps} fps, audio {audio}; run took {took:.1f} s in the page")
                assert n == N_FRAMES
                assert fps == Fraction(FPS)
                assert (w, h) == (64, 36) and abs(w / h - 16 / 9) < 0.01
                assert audio == ["aac"]  # the source's audio is kept

                save_screenshot(page, tmp_path)

                # 3) bad inputs: a message in the page each time, and the app keeps serving
                upload(page, not_video)
                text = wait_status(page, app, r"^(Ready|Error)", 60)
                assert text.startswith("Error: cannot read video") and "notes.mp4" in text, text
                text = run_and_wait(page, app)
                assert text.startswith("Error: cannot read video") and "notes.mp4" in text, text

                upload(page, long_clip)
                text = wait_status(page, app, r"^(Ready|Error)", 60)
                assert text.startswith(f"Error: long_clip.mp4 has more than {MAX_FRAMES} frames"), text

                upload(page, too_big)  # refused before it is sent: Gradio's own message, from --max-mb
                page.get_by_text(re.compile(r'exceed the maximum allowed size .*"too_big\.mp4"')).first.wait_for(
                    timeout=30_000)

                upload(page, clip)
                wait_status(page, app, r"^Ready", 60)
                page.get_by_label("Custom W:H", exact=True).check()
                page.locator("#custom-ratio textarea, #custom-ratio input").first.fill("16:0")
                text = run_and_wait(page, app)
                assert text.startswith("Error: ratio must be W:H with positive integers"), text

                page.get_by_label("16:9", exact=True).check()
                text = run_and_wait(page, app)
                assert text.startswith("Done"), text
                assert app.proc.poll() is None
            finally:
                browser.close()
    finally:
        rc = app.stop()
    assert rc == 0, app.text()[-3000:]
    assert not workdir.exists(), f"{workdir} left behind"


def test_app_offline_default_weights_is_one_line(tmp_path):
    """Default weights, nothing cached, no hub: one line naming the download command, exit 1, no server."""
    need_gradio()
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               M3DDM_JAX_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    port = free_port()
    r = subprocess.run([sys.executable, str(REPO / "app.py"), "--port", str(port)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("app.py: error: "), r.stderr
    assert "python -m m3ddm_jax.download" in lines[0] and "--weights DIR" in lines[0], lines[0]
    assert not list(tmp_path.glob("m3ddm-app-*")), "a temporary folder was left behind"


def test_checks_without_a_browser(tmp_path):
    """The app's checks and housekeeping (app.Outpaint, no model, no server): limits, impossible shapes, pruning."""
    sys.path.insert(0, str(REPO))
    try:
        import app
    finally:
        sys.path.remove(str(REPO))
    from m3ddm_jax.errors import UserError

    clip = make_clip(tmp_path / "clip.mp4", N_FRAMES, audio=False)
    op = app.Outpaint(None, tmp_path / "work", app.Limits(max_mb=0, max_frames=0, max_seconds=0), keep_seconds=60)
    probe = op.probe(clip)
    assert (probe.num_frames, probe.width, probe.height, probe.fps, probe.is_image) == (N_FRAMES, W, H, FPS, False)

    def refused(limits=None, path=clip, **req) -> str:
        o = app.Outpaint(None, tmp_path / "work", limits) if limits else op
        with pytest.raises(UserError) as e:
            p = o.probe(path)
            r = app.Request(**req)
            ratio, pad = o.target(r)
            o.check_geometry(p, ratio, pad, r)
        return str(e.value)

    size_mb = clip.stat().st_size / 1e6
    assert refused(app.Limits(max_mb=size_mb / 2, max_frames=0, max_seconds=0)).startswith(
        f"clip.mp4 is {size_mb:.1f} MB; this demo takes files up to")
    assert "more than 16 frames" in refused(app.Limits(max_mb=0, max_frames=16, max_seconds=0))
    assert refused(app.Limits(max_mb=0, max_frames=0, max_seconds=1)) == \
        f"clip.mp4 lasts {N_FRAMES / FPS:.1f} s; this demo takes videos up to 1 s"
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    assert refused(path=text).startswith("notes.txt: not a video or an image this demo reads")
    assert refused(target=app.CUSTOM, custom_ratio="16:0").startswith("ratio must be W:H with positive integers")
    assert refused(target=app.CUSTOM, custom_ratio="") == "type a ratio W:H (e.g. 2:1) in the custom ratio box"
    assert "too thin" in refused(target=app.CUSTOM, custom_ratio="100:1", output_size=64)  # the library's check
    assert "too thin to outpaint" in refused(target=app.CUSTOM, custom_ratio="6:1", output_size=64)  # 64x10: the app's
    assert refused(target=app.PADDING, pad=(0, 0, 0, 0)).startswith("padding is 0 on every side")
    assert refused(target=app.PADDING, pad=(-1, 5, 0, 0)).startswith("padding must be four non-negative")
    assert refused(output_size=32).startswith("output size must be at least 64")
    assert refused(steps=1).startswith("steps must be at least 2")
    assert app.Outpaint.target(app.Request(target=app.PADDING, pad=(10, 10.0, None, 0))) == (None, (10, 10, 0, 0))

    # pruning: result folders older than the keep time go, newer ones stay
    old, new = op.results / "old", op.results / "new"
    for d in (old, new):
        d.mkdir()
        (d / "x.mp4").write_bytes(b"0")
    os.utime(old, (time.time() - 120, time.time() - 120))
    assert op.prune() == 1 and not old.exists() and new.exists()

    # cancel marks only the named job; the message names where the run stopped
    job = op.new_job()
    assert op.cancel(job) and op.jobs[job].is_set() and not op.cancel("nope")
    from m3ddm_jax.outpaint.pipeline import Progress

    assert app.cancelled_line(Progress(step=1, total_steps=8, window=0, windows=2)) == \
        "Cancelled: stopped at the end of window 1/2 (4 of 8 steps done)"
    assert app.cancelled_line(Progress(step=4, total_steps=8, window=1, windows=2)) == \
        "Cancelled: stopped at the end of window 1/2 (4 of 8 steps done)"
