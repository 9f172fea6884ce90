"""Reading and writing videos (one place for codecs): PyAV (FFmpeg) for video and audio, OpenCV for images.

* :func:`read_video` -> :class:`Video` (uint8 RGB frames ``(F, H, W, 3)``, fps, path). Still images
  (png/jpg/bmp/webp/tif) are read as 1-frame videos.
* :func:`write_video`: the extension decides the format (H.264 in .mp4/.m4v/.mov/.mkv, VP9 in .webm, a real
  GIF, or one frame as .png/.jpg/...; anything else, or several frames into an image path, is refused with
  one line), exact frame count and frame rate, the source's audio stream copied (or re-encoded with the same
  channel layout where the container cannot hold its codec). Everything is written to a dot-named temporary
  in the destination folder and renamed at the end (:mod:`m3ddm_jax.atomic`), so a failure, a full disk or a
  kill never leaves a half-written file under the destination's name; files get the user's umask.
* :func:`write_frames_png`: one PNG per frame into a folder (never deleting anything but earlier frames).

Every user-caused failure (missing file, not a video, no frames, unwritable destination) raises
:class:`~m3ddm_jax.errors.UserError` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import os
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


# -- writing: the extension decides the format ---------------------------------------------------------------------

# output extension -> (muxer, audio codecs stream-copied as they are, audio codec when the source's must be re-encoded)
VIDEO_WRITE = {
    ".mp4": ("mp4", {"aac", "mp3", "alac", "ac3", "eac3"}, "aac"),
    ".m4v": ("mp4", {"aac", "mp3", "alac", "ac3", "eac3"}, "aac"),
    ".mov": ("mov", {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be",
                     "pcm_f32le"}, "aac"),
    ".mkv": ("matroska", {"aac", "mp3", "opus", "vorbis", "flac", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le",
                          "pcm_f32le"}, "aac"),
    ".webm": ("webm", {"opus", "vorbis"}, "libopus"),
    ".gif": ("gif", set(), None),  # GIF holds no audio
}
WRITE_FORMATS = "video .mp4 .m4v .mov .mkv (H.264), .webm (VP9), .gif; one frame: .png .jpg .jpeg .bmp .webp .tif .tiff"


def _tmp_path(dest: Path) -> Path:
    """A new empty temporary file beside ``dest``: ``.<name>.partial-<pid>-<random><suffix>`` (a dot-file, mode
    0o666 minus the umask); temporaries of killed runs for the same ``dest`` are removed first."""
    from m3ddm_jax.atomic import new_file  # noqa: PLC0415

    return new_file(dest)


def check_writable(dest: str | os.PathLike, num_frames: int | None = None, lossless: bool = False) -> Path:
    """Fail early (before any compute) with one line if ``dest`` cannot be written as what its extension says:
    an unknown extension, several frames into a still-image path, ``lossless`` into a lossy-only format, a
    missing or read-only folder."""
    dest = Path(dest)
    ext = dest.suffix.lower()
    if dest.exists() and dest.is_dir():
        raise UserError(f"output {dest} is a folder; give a file name")
    if ext in IMAGE_EXTS:
        if num_frames is not None and num_frames > 1:
            raise UserError(f"output {dest} is a single image but the result has {num_frames} frames; give a video "
                            f"name (.mp4, .mov, .mkv, .webm, .gif) or write one PNG per frame (infer.py --png-frames DIR)")
        if lossless and ext in (".jpg", ".jpeg"):
            raise UserError(f"output {dest}: JPEG is lossy; use .png for a lossless image")
    elif ext in VIDEO_WRITE:
        if lossless and ext == ".gif":
            raise UserError(f"output {dest}: GIF has 256 colours and cannot be lossless; use .mp4, .mkv or .webm")
    else:
        what = f"extension {dest.suffix!r}" if dest.suffix else "no extension"
        raise UserError(f"output {dest} has {what}; the extension decides the format: {WRITE_FORMATS}")
    if not dest.parent.exists():
        raise UserError(f"output folder does not exist: {dest.parent}")
    if not os.access(dest.parent, os.W_OK):
        raise UserError(f"output folder is not writable: {dest.parent}")
    return dest


def written_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of a written video or image, read back from the file."""
    path = Path(path)
    if is_image_path(path):
        import cv2  # noqa: PLC0415

        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        return int(img.shape[1]), int(img.shape[0])
    import av  # noqa: PLC0415

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return int(s.codec_context.width), int(s.codec_context.height)


def _open_audio(source):
    """The source's container when it has an audio stream, else None."""
    if source is None or is_image_path(source):
        return None
    import av  # noqa: PLC0415

    try:
        c = av.open(str(source))
    except Exception:  # not readable as media: no audio to keep
        return None
    if not c.streams.audio:
        c.close()
        return None
    return c


class _AudioTrack:
    """The source's first audio stream in the output: stream-copied (its packets remuxed, no re-encoding) when
    the container takes its codec, else re-encoded with the same channel layout and sample rate; trimmed to the
    video's duration (copies at packet granularity: at most one audio frame, ~23 ms for 44.1 kHz AAC, longer)."""

    def __init__(self, out, source, ext: str):
        _, copyable, reencode = VIDEO_WRITE[ext]
        self.src = source
        self.ia = source.streams.audio[0]
        vs = source.streams.video
        v0 = vs[0].start_time * vs[0].time_base if vs and vs[0].start_time is not None else 0
        self.v0 = float(v0)  # the source's first video frame: audio is kept in sync relative to it
        self.copy = self.ia.codec_context.name in copyable
        if self.copy:
            self.oa = out.add_stream_from_template(self.ia)
        else:
            rate = self.ia.codec_context.sample_rate or 48000
            if reencode == "libopus" and rate not in (8000, 12000, 16000, 24000, 48000):
                rate = 48000
            self.oa = out.add_stream(reencode, rate=rate, layout=self.ia.codec_context.layout.name)

    def mux(self, out, duration: float) -> None:
        import av  # noqa: PLC0415

        ia, tb = self.ia, self.ia.time_base
        if self.copy:
            shift = int(round(self.v0 / tb)) if tb else 0
            for packet in self.src.demux(ia):
                if packet.dts is None or packet.pts is None:
                    continue  # demuxer flush packet
                start = (packet.pts - shift) * tb
                if start >= duration:
                    break
                # packets before 0 are kept: AAC's priming packet, or audio that starts before the first frame
                packet.pts -= shift
                packet.dts -= shift
                packet.stream = self.oa
                out.mux(packet)
        else:
            for frame in self.src.decode(ia):
                if frame.pts is None:
                    continue
                start = float(frame.pts * frame.time_base) - self.v0
                keep = int(round((duration - start) * frame.sample_rate))
                if keep <= 0:
                    break
                if keep < frame.samples:  # cut the last frame at the video's end, sample-exact
                    arr = frame.to_ndarray()
                    arr = arr[:, :keep] if frame.format.is_planar else arr[:, :keep * len(frame.layout.channels)]
                    cut = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=frame.format.name,
                                                     layout=frame.layout.name)
                    cut.sample_rate = frame.sample_rate
                    frame = cut
                frame.pts = None
                for packet in self.oa.encode(frame):
                    out.mux(packet)
            for packet in self.oa.encode():
                out.mux(packet)


def _gif_frames(frames: np.ndarray, rate: Fraction):
    """RGB frames -> pal8 frames through FFmpeg's palettegen/paletteuse (one palette for the clip, dithered)."""
    import av  # noqa: PLC0415

    h, w = frames.shape[1:3]
    g = av.filter.Graph()
    src = g.add_buffer(width=w, height=h, format="rgb24", time_base=1 / rate)
    split, gen = g.add("split"), g.add("palettegen", "stats_mode=full")
    use, sink = g.add("paletteuse", "dither=sierra2_4a"), g.add("buffersink")
    src.link_to(split)
    split.link_to(gen, 0, 0)
    split.link_to(use, 1, 0)
    gen.link_to(use, 0, 1)
    use.link_to(sink)
    g.configure()
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
        vf.pts, vf.time_base = i, 1 / rate
        g.push(vf)
    g.push(None)
    while True:
        try:
            yield g.pull()
        except (av.error.EOFError, av.error.BlockingIOError):
            return


def write_video(dest: str | os.PathLike, frames: np.ndarray, fps: float | Fraction, *, audio_from: str | os.PathLike | None = None,
                crf: int = 18, lossless: bool = False) -> Path:
    """Write uint8 RGB ``(F, H, W, 3)`` frames as the format ``dest``'s extension names (see :data:`VIDEO_WRITE`;
    anything else is refused with one line): H.264 in .mp4/.m4v/.mov/.mkv, VP9 in .webm (``crf`` on each
    codec's scale; ``lossless`` = H.264 RGB or VP9 lossless RGB, bit-exact), a real GIF (one dithered 256-colour
    palette, delays in 1/100 s), or a single image (.png/.jpg/...; several frames into an image path are
    refused). yuv420p needs even sizes: an odd width or height loses its last column/row (read the written size
    back with :func:`written_size`). The source's audio (``audio_from``) keeps its codec and channel layout
    (stream copy) where the container takes it, else is re-encoded with the same layout; it is trimmed to the
    video's duration. Written under a dot-named temporary and renamed when complete (see
    :mod:`m3ddm_jax.atomic`): no partial file on any failure; the file gets the user's umask."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"write_video needs uint8 (F, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    dest = check_writable(dest, num_frames=frames.shape[0], lossless=lossless)
    from m3ddm_jax.atomic import atomic_file  # noqa: PLC0415

    ext = dest.suffix.lower()
    if ext in IMAGE_EXTS:
        import cv2  # noqa: PLC0415

        ok, buf = cv2.imencode(ext, np.ascontiguousarray(frames[0][:, :, ::-1]))
        if not ok:
            raise UserError(f"cannot encode {dest} as {ext}")
        with atomic_file(dest) as tmp:
            tmp.write_bytes(buf.tobytes())
        return dest
    import av  # noqa: PLC0415

    muxer = VIDEO_WRITE[ext][0]
    rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
    if ext == ".gif":
        codec, pix_fmt, options = "gif", "pal8", {}
    elif ext == ".webm":
        codec, pix_fmt = "libvpx-vp9", ("gbrp" if lossless else "yuv420p")
        options = {"lossless": "1"} if lossless else {"crf": str(crf), "b": "0"}
    else:
        codec, pix_fmt = ("libx264rgb", "rgb24") if lossless else ("libx264", "yuv420p")
        options = {"crf": "0" if lossless else str(crf), "preset": "medium"}
    if pix_fmt == "yuv420p":
        h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
        if h == 0 or w == 0:
            raise UserError(f"cannot write {dest}: a {frames.shape[2]}x{frames.shape[1]} video is too small for yuv420p")
        frames = frames[:, :h, :w]
    audio_in = None if ext == ".gif" else _open_audio(audio_from)
    try:
        with atomic_file(dest) as tmp:
            with av.open(str(tmp), mode="w", format=muxer) as out:
                vs = out.add_stream(codec, rate=rate)
                vs.width, vs.height = frames.shape[2], frames.shape[1]
                vs.pix_fmt = pix_fmt
                vs.options = options
                audio = _AudioTrack(out, audio_in, ext) if audio_in is not None else None
                if ext == ".gif":
                    source = _gif_frames(frames, rate)
                else:
                    source = (av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24") for f in frames)
                for i, vf in enumerate(source):
                    vf.pts = i
                    for packet in vs.encode(vf):
                        out.mux(packet)
                for packet in vs.encode():
                    out.mux(packet)
                if audio is not None:
                    audio.mux(out, len(frames) / float(rate))
    finally:
        if audio_in is not None:
            audio_in.close()
    return dest


def write_frames_png(folder: str | os.PathLike, frames: np.ndarray, prefix: str = "frame") -> Path:
    """One lossless PNG per frame (``frame_00000.png``...), written into a temporary dot-folder then renamed.

    ``folder`` may exist when it is empty or holds only ``<prefix>_NNNNN.png`` files (a previous run's frames,
    replaced as a whole); a folder holding anything else is refused (see :func:`check_frames_folder`)."""
    import cv2  # noqa: PLC0415

    from m3ddm_jax.atomic import default_mode, new_dir, reason, remove  # noqa: PLC0415

    folder = check_frames_folder(folder, prefix)
    tmp = new_dir(folder)
    old = None
    try:
        for i, f in enumerate(frames):
            ok, buf = cv2.imencode(".png", np.ascontiguousarray(f[:, :, ::-1]))
            if not ok:
                raise UserError(f"cannot encode frame {i} as PNG")
            (tmp / f"{prefix}_{i:05d}.png").write_bytes(buf.tobytes())
        for f in tmp.iterdir():
            default_mode(f)
        if folder.exists():
            old = new_dir(folder)
            os.replace(folder, old / "old")
        os.replace(tmp, folder)
    except OSError as e:
        if old is not None and (old / "old").exists() and not folder.exists():
            os.replace(old / "old", folder)
        raise UserError(f"cannot write {folder}: {reason(e)}") from e
    finally:
        remove(tmp)
        if old is not None:
            remove(old)
    return folder


def check_frames_folder(folder: str | os.PathLike, prefix: str = "frame") -> Path:
    """Fail early if ``folder`` cannot take :func:`write_frames_png`'s frames without deleting anything else."""
    import re  # noqa: PLC0415

    from m3ddm_jax.atomic import MARK  # noqa: PLC0415

    folder = Path(folder)
    if not folder.parent.exists():
        raise UserError(f"output folder does not exist: {folder.parent}")
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"{folder} exists and is not a folder")
        pattern = re.compile(rf"{re.escape(prefix)}_\d{{5,}}\.png")
        other = sorted(f.name for f in folder.iterdir() if not pattern.fullmatch(f.name) and MARK not in f.name)
        if other:
            raise UserError(f"{folder} holds other files ({', '.join(other[:3])}{' ...' if len(other) > 3 else ''}); "
                            f"give a new or empty folder for the frames")
    return folder


def export_to_video(video, output_path: str | os.PathLike, fps: float | Fraction | None = None, *,
                    audio_from: str | os.PathLike | None | bool = True, crf: int = 18, lossless: bool = False) -> Path:
    """Write an outpainting result (or uint8 ``(F, H, W, 3)`` frames) like diffusers' ``export_to_video``, in the
    format the extension names (see :func:`write_video`: .mp4/.mov/.mkv/.webm/.gif, or an image for a 1-frame
    result): atomic, exact frame count and rate, the source's audio kept.

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
