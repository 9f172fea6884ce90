"""Reading and writing videos (one place for codecs): PyAV (FFmpeg) for video and audio, OpenCV for images.

* :func:`read_video` -> :class:`Video` (uint8 RGB frames ``(F, H, W, 3)``, fps, path). Still images
  (png/jpg/bmp/webp/tif) are read as 1-frame videos.
* :func:`write_video`: H.264 MP4 (yuv420p by default, ``crf`` selectable; ``lossless=True`` writes
  H.264 in RGB, bit-exact), exact frame count and frame rate, the source's audio stream muxed back when
  present. A still-image path writes a PNG/JPEG instead. Everything is written to a temporary name in the
  destination folder and renamed at the end, so a failure never leaves a half-written file.
* :func:`write_frames_png`: one PNG per frame into a folder.

Every user-caused failure (missing file, not a video, no frames, unwritable destination) raises
:class:`~m3ddm_jax.errors.UserError` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from m3ddm_jax.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif"}


@dataclasses.dataclass
class Video:
    frames: np.ndarray          # uint8 (F, H, W, 3), RGB
    fps: float
    path: Path | None = None
    is_image: bool = False
    fps_fraction: Fraction | None = None  # exact rate when the container gives one

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> Video:
    path = Path(path)
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if not path.is_file():
        raise UserError(f"input is not a file: {path}")
    if is_image_path(path):
        import cv2  # noqa: PLC0415

        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f"cannot read image {path}: not an image or corrupt")
        return Video(img[None, :, :, ::-1].copy(), fps=1.0, path=path, is_image=True, fps_fraction=Fraction(1))
    import av  # noqa: PLC0415

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except UserError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends: not a video / corrupt
        raise UserError(f"cannot read video {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'}") from e
    if not frames:
        raise UserError(f"{path} has no frames")
    fps = float(rate) if rate else 30.0
    return Video(np.stack(frames), fps=fps, path=path, fps_fraction=Fraction(rate) if rate else None)


def _tmp_path(dest: Path) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=dest.suffix, dir=dest.parent)
    except OSError as e:
        raise UserError(f"cannot write to {dest.parent}: {e.strerror or e}") from e
    os.close(fd)
    return Path(name)


def check_writable(dest: str | os.PathLike) -> Path:
    """Fail early (before any compute) if ``dest`` cannot be written."""
    dest = Path(dest)
    if dest.exists() and dest.is_dir():
        raise UserError(f"output {dest} is a folder; give a file name")
    if not dest.parent.exists():
        raise UserError(f"output folder does not exist: {dest.parent}")
    if not os.access(dest.parent, os.W_OK):
        raise UserError(f"output folder is not writable: {dest.parent}")
    return dest


def write_video(dest: str | os.PathLike, frames: np.ndarray, fps: float | Fraction, *, audio_from: str | os.PathLike | None = None,
                crf: int = 18, lossless: bool = False) -> Path:
    """Write uint8 RGB ``(F, H, W, 3)`` frames. Odd sizes lose their last row/column (yuv420p needs even sizes)."""
    dest = check_writable(dest)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"write_video needs uint8 (F, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    if is_image_path(dest):
        import cv2  # noqa: PLC0415

        tmp = _tmp_path(dest)
        try:
            if not cv2.imwrite(str(tmp), frames[0][:, :, ::-1]):
                raise UserError(f"cannot write image {dest}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest
    import av  # noqa: PLC0415

    if not lossless:
        h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
        frames = frames[:, :h, :w]
    rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
    tmp = _tmp_path(dest)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            codec = "libx264rgb" if lossless else "libx264"
            vs = out.add_stream(codec, rate=rate)
            vs.width, vs.height = frames.shape[2], frames.shape[1]
            vs.pix_fmt = "rgb24" if lossless else "yuv420p"
            vs.options = {"crf": "0" if lossless else str(crf), "preset": "medium"}
            audio_in = None
            if audio_from is not None and not is_image_path(audio_from):
                try:
                    audio_in = av.open(str(audio_from))
                    if not audio_in.streams.audio:
                        audio_in.close()
                        audio_in = None
                except Exception:
                    audio_in = None
            a_out = None
            if audio_in is not None:
                a_in = audio_in.streams.audio[0]
                a_out = out.add_stream("aac", rate=a_in.rate or 44100)
            for i, f in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                vf.pts = i
                for packet in vs.encode(vf):
                    out.mux(packet)
            for packet in vs.encode():
                out.mux(packet)
            if audio_in is not None:
                duration = len(frames) / float(rate)
                for af in audio_in.decode(audio_in.streams.audio[0]):
                    if af.time is not None and af.time >= duration:
                        break
                    af.pts = None
                    for packet in a_out.encode(af):
                        out.mux(packet)
                for packet in a_out.encode():
                    out.mux(packet)
                audio_in.close()
        os.replace(tmp, dest)
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"cannot write {dest}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def write_frames_png(folder: str | os.PathLike, frames: np.ndarray, prefix: str = "frame") -> Path:
    """One lossless PNG per frame (``frame_00000.png``...), written into a temp folder then renamed."""
    import cv2  # noqa: PLC0415

    folder = Path(folder)
    if not folder.parent.exists():
        raise UserError(f"output folder does not exist: {folder.parent}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for i, f in enumerate(frames):
            cv2.imwrite(str(tmp / f"{prefix}_{i:05d}.png"), np.ascontiguousarray(f[:, :, ::-1]))
        if folder.exists():
            import shutil  # noqa: PLC0415

            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            import shutil  # noqa: PLC0415

            shutil.rmtree(tmp)
    return folder


def export_to_video(video, output_path: str | os.PathLike, fps: float | Fraction | None = None, *,
                    audio_from: str | os.PathLike | None | bool = True, crf: int = 18, lossless: bool = False) -> Path:
    """Write an outpainting result (or uint8 ``(F, H, W, 3)`` frames) as an H.264 MP4 (or an image for a
    still-image path), like diffusers' ``export_to_video``: atomic, exact frame count and rate.

    ``video``: an :class:`~m3ddm_jax.outpaint.pipeline.OutpaintResult` (its frame rate and its source's audio
    are used), a :class:`Video`, or frames. ``fps`` overrides the rate (required for bare frames).
    ``audio_from``: True = the result's source file when known, a path, or None/False for no audio.
    Returns the written path.
    """
    frames = getattr(video, "frames", video)
    source = getattr(video, "source", None) if hasattr(video, "source") else getattr(video, "path", None)
    if fps is None:
        fps = getattr(video, "fps_fraction", None) or getattr(video, "fps", None)
        if fps is None:
            raise ValueError("export_to_video needs fps for bare frames")
    if audio_from is True:
        audio_from = source
    elif audio_from is False:
        audio_from = None
    return write_video(output_path, np.asarray(frames), fps, audio_from=audio_from, crf=crf, lossless=lossless)
