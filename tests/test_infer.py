"""Outpainting inference end to end (tiny fixture U-Net + tiny random VAE): API, infer.py, bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m3ddm_jax.outpaint import canvas as cv
from m3ddm_jax.outpaint.pipeline import OutpaintConfig, Outpainter
from m3ddm_jax.video import read_video, write_video
from tests.media import Tone, encode

REPO = Path(__file__).resolve().parents[1]
STEPS = 10     # API tests: every test shares one compiled loop (64x64 canvas, 10 steps)
SIZE = 64


def synthetic_video(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Moving colour gradients with a little noise: uint8 (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (xx * 255 // max(w - 1, 1) + 3 * i) % 256
        frames[i, ..., 1] = (yy * 255 // max(h - 1, 1)) % 256
        frames[i, ..., 2] = (128 + 60 * np.sin((xx + yy + 4 * i) / 7.0)).astype(np.uint8)
    return np.clip(frames.astype(int) + rng.integers(-3, 4, frames.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def models(weights_dir):
    from m3ddm_jax.weights import load_models

    return load_models(weights_dir)


def run_api(models, frames, fps=24.0, **cfg):
    unet, vae = models
    cfg.setdefault("output_size", SIZE)
    cfg.setdefault("steps", STEPS)
    op = Outpainter(unet, vae, OutpaintConfig(**cfg))
    return op, op(frames, fps)


def known_region(result, frames):
    g = result.geometry
    fy, fx = g.frame_in_box
    small = cv.resize_frames(frames, (g.frame_h, g.frame_w))
    return result.frames[:, fy:fy + g.frame_h, fx:fx + g.frame_w], small


@pytest.mark.parametrize(
    "src_hw, ratio, out_hw",
    [((96, 54), "16:9", (36, 64)),    # 9:16 -> 16:9
     ((96, 54), "1:1", (64, 64)),     # 9:16 -> 1:1
     ((48, 64), "21:9", (27, 64)),    # 4:3 -> 21:9
     ((54, 96), "9:16", (64, 36))],   # 16:9 -> 9:16 (vertical outpainting)
)
def test_ratios(models, src_hw, ratio, out_hw):
    frames = synthetic_video(5, *src_hw)
    op, r = run_api(models, frames, ratio=ratio)
    assert r.frames.shape == (5, *out_hw, 3)
    kept, small = known_region(r, frames)
    np.testing.assert_array_equal(kept, small)
    assert op.denoiser.trace_count == 1  # one compile shared by every test of this file


def test_per_side_padding(models):
    frames = synthetic_video(4, 48, 48)
    _, r = run_api(models, frames, ratio=None, pad=(48, 0, 0, 24))   # left 48, bottom 24 (source pixels)
    g = r.geometry
    assert (g.full_h, g.full_w) == (72, 96) and r.frames.shape == (4, 48, 64, 3)
    kept, small = known_region(r, frames)
    np.testing.assert_array_equal(kept, small)
    assert g.frame_in_box == (0, 32)  # the frame sits top-right: padding went left and below


def test_one_frame_and_full_resolution(models):
    frames = synthetic_video(1, 96, 54)
    _, r = run_api(models, frames, ratio="16:9", full_res=True)
    g = r.geometry
    assert r.frames.shape == (1, g.full_h, g.full_w, 3) == (1, 96, 171, 3)
    np.testing.assert_array_equal(r.frames[:, g.full_top:g.full_top + 96, g.full_left:g.full_left + 54], frames)


def test_ratio_equal_to_input_is_a_copy(models):
    frames = synthetic_video(3, 36, 64)
    _, r = run_api(models, frames, ratio="16:9")
    assert r.copied and r.frames.shape == (3, 36, 64, 3) and r.windows == 0
    np.testing.assert_array_equal(r.frames, frames)


def test_long_video_all_passes_one_compile(models):
    frames = synthetic_video(120, 48, 27)
    op, r = run_api(models, frames, ratio="16:9")
    assert r.frames.shape[0] == 120 and r.windows == 11  # strides 15, 5, 1 (reference: 11 windows)
    kept, small = known_region(r, frames)
    np.testing.assert_array_equal(kept, small)
    # every frame was written: no frame is left black in the generated border
    g = r.geometry
    border = r.frames[:, :, : g.frame_in_box[1]]
    assert (border.reshape(120, -1).max(axis=1) > 0).all()
    assert op.denoiser.trace_count == 1, "the sampler must compile once for all windows and passes"


def test_seed_fixes_everything(models):
    frames = synthetic_video(4, 96, 54)
    _, a = run_api(models, frames, seed=3)
    _, b = run_api(models, frames, seed=3)
    _, c = run_api(models, frames, seed=4)
    np.testing.assert_array_equal(a.frames, b.frames)
    mask = np.ones(a.frames.shape[1:3], bool)
    fy, fx = a.geometry.frame_in_box
    mask[fy:fy + a.geometry.frame_h, fx:fx + a.geometry.frame_w] = False
    assert np.abs(a.frames[:, mask].astype(int) - c.frames[:, mask].astype(int)).max() > 0
    np.testing.assert_array_equal(a.frames[:, ~mask], c.frames[:, ~mask])


# -- the command line ------------------------------------------------------------------------------

def _make_input(path: Path, frames: np.ndarray, fps: float, audio: bool = False) -> Path:
    if not audio:
        return write_video(path, frames, fps, lossless=True)
    return encode(path, frames, int(fps), tone=Tone(hz=440.0, seconds=len(frames) / fps))


def _infer(*args, cwd=None, **env_extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env_extra)
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=900)


def test_infer_cli_end_to_end(weights_dir, tmp_path):
    import av

    frames = synthetic_video(37, 96, 54)
    src = _make_input(tmp_path / "in.mp4", frames, 24, audio=True)
    before = src.read_bytes()
    out = tmp_path / "out.mp4"
    p = _infer(src, "--ratio", "16:9", "--output", out, "--weights", weights_dir, "--output-size", SIZE,
               "--png-frames", tmp_path / "png", "--quiet")
    print(p.stdout, p.stderr)
    assert p.returncode == 0, p.stderr
    assert src.read_bytes() == before  # the input is never touched
    v = read_video(out)
    assert v.num_frames == 37 and abs(v.fps - 24.0) < 1e-6 and v.frames.shape[1:3] == (36, 64)
    with av.open(str(out)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
        assert c.streams.video[0].codec_context.name == "h264" and c.streams.video[0].format.name == "yuv420p"
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 37
    import cv2

    got = np.stack([cv2.imread(str(f))[:, :, ::-1] for f in pngs])
    small = cv.resize_frames(frames, (36, 20))
    np.testing.assert_array_equal(got[:, :, 22:42], small)  # known region == input at output size
    assert "37 frames" in p.stdout and "windows" in p.stdout
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize("case", ["missing", "text_as_mp4", "zero_frames", "ratio_zero", "ratio_abc", "unwritable", "corrupt_weights",
                                  "offline_default_weights"])
def test_infer_bad_input(case, weights_dir, tmp_path):
    good = write_video(tmp_path / "good.mp4", synthetic_video(3, 32, 18), 24, lossless=True)
    args = [good, "--weights", weights_dir, "--output", tmp_path / "out.mp4", "--quiet"]
    if case == "missing":
        args[0] = tmp_path / "nope.mp4"
    elif case == "text_as_mp4":
        (tmp_path / "text.mp4").write_text("hello, not a video\n")
        args[0] = tmp_path / "text.mp4"
    elif case == "zero_frames":
        import av

        with av.open(str(tmp_path / "empty.mp4"), "w") as c:
            s = c.add_stream("libx264", rate=24)
            s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
            c.start_encoding()  # header only: a container without a single frame
        assert (tmp_path / "empty.mp4").stat().st_size > 0
        args[0] = tmp_path / "empty.mp4"
    elif case == "ratio_zero":
        args += ["--ratio", "0:1"]
    elif case == "ratio_abc":
        args += ["--ratio", "abc"]
    elif case == "unwritable":
        args[args.index("--output") + 1] = tmp_path / "no" / "such" / "dir" / "out.mp4"
    elif case == "corrupt_weights":
        bad = tmp_path / "badweights"
        (bad / "unet").mkdir(parents=True)
        (bad / "unet" / "config.json").write_text((weights_dir / "unet" / "config.json").read_text())
        (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 100)
        (bad / "vae").symlink_to(weights_dir / "vae")
        args[args.index("--weights") + 1] = bad
    env = {}
    if case == "offline_default_weights":  # no --weights, nothing cached, no network: what to download, one line
        del args[1:3]
        env = {"HF_HOME": str(tmp_path / "hf"), "M3DDM_JAX_CACHE": str(tmp_path / "cache")}
    p = _infer(*args, **env)
    err = p.stderr.strip().splitlines()
    print(case, "->", p.stderr.strip())
    assert p.returncode != 0
    assert len(err) == 1 and err[0].startswith("infer.py: error:") and "Traceback" not in p.stderr
    assert not (tmp_path / "out.mp4").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]
    if case == "offline_default_weights":
        assert "MurakawaTakuya/M3DDM-Plus" in err[0] and "--weights" in err[0]
        assert "python -m m3ddm_jax.download DIR" in err[0] and "VAE" in err[0]  # every missing piece, one line


def test_resolve_weights_local_layouts(weights_dir, tmp_path, monkeypatch):
    from m3ddm_jax.errors import CheckpointError
    from m3ddm_jax.weights import resolve_weights

    unet, vae = resolve_weights(weights_dir)
    assert unet == weights_dir / "unet" and vae == weights_dir / "vae"
    # a U-Net folder alone plus an explicit VAE folder
    unet, vae = resolve_weights(weights_dir / "unet", vae=weights_dir / "vae")
    assert unet == weights_dir / "unet" and vae == weights_dir / "vae"
    with pytest.raises(CheckpointError, match="weights not found"):
        resolve_weights(tmp_path / "missing" / "folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no unet/ folder"):
        resolve_weights(tmp_path / "empty")


def test_hub_weights_are_converted_once_and_cached(weights_dir, tmp_path, monkeypatch):
    """A hub download (simulated by a local PyTorch folder) is converted to Flax once and reused."""
    import m3ddm_jax.weights as W

    monkeypatch.setenv("M3DDM_JAX_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(repo_id, subfolder, what):
        calls.append((repo_id, subfolder))
        return weights_dir / ("vae" if subfolder else "unet")

    monkeypatch.setattr(W, "_download", fake_download)
    unet, vae = W.resolve_weights("someone/some-m3ddm")
    assert calls == [("someone/some-m3ddm", None), (W.DEFAULT_VAE_REPO, "vae")]
    assert (unet / "flax_model.safetensors").is_file() and (vae / "flax_model.safetensors").is_file()
    stamp = (unet / "flax_model.safetensors").stat().st_mtime_ns
    unet2, _ = W.resolve_weights("someone/some-m3ddm")
    assert unet2 == unet and (unet / "flax_model.safetensors").stat().st_mtime_ns == stamp
    # the cached Flax weights equal the PyTorch ones
    from m3ddm_jax.interop.unet import load_unet_flat

    _, a = load_unet_flat(weights_dir / "unet")
    _, b = load_unet_flat(unet)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
