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


def _check_input(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if not path.is_file():
        raise UserError(f"input is not a file: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes)")
    return path


def _read_image(path: Path) -> np.ndarray:
    """uint8 RGB ``(1, H, W, 3)``; OpenCV applies the EXIF orientation."""
    import cv2  # noqa: PLC0415

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"cannot read image {path}: not an image or corrupt")
    return img[None, :, :, ::-1].copy()


def upright(img: np.ndarray, rotation: float) -> np.ndarray:
    """``img`` turned by its display matrix's rotation (``VideoFrame.rotation``: degrees counter-clockwise, as
    FFmpeg's players apply it), rounded to a quarter turn; flips in the matrix are not applied."""
    k = int(round((rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def _read_error(path: Path, e: BaseException) -> UserError:
    msg = str(e).splitlines()[0] if str(e) else "corrupt"
    return UserError(f"cannot read video {path}: {type(e).__name__}: {msg}")


def _decode(path: Path, max_frames: int | None = None, rgb: bool = True):
    """The one decoder: yields ``(frame, rotation)`` of the first video stream in presentation order, as uint8
    RGB ``(H, W, 3)`` turned upright (``rgb=True``) or as the raw ``av.VideoFrame`` (``rgb=False``: counting).
    Every failure is a one-line :class:`UserError`."""
    import av  # noqa: PLC0415

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                only = " (audio only)" if container.streams.audio else ""
                raise UserError(f"{path} has no video stream{only}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            n = 0
            for frame in container.decode(stream):
                if max_frames is not None and n >= max_frames:
                    break
                rot = frame.rotation
                yield (upright(frame.to_ndarray(format="rgb24"), rot) if rgb else frame), rot
                n += 1
    except UserError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends: not a video / corrupt
        raise _read_error(path, e) from e


def _rate(path: Path):
    """The container's frame rate of the first video stream (average, else guessed, else base), or None."""
    import av  # noqa: PLC0415

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            return stream.average_rate or stream.guessed_rate or stream.base_rate
    except Exception as e:
        raise _read_error(path, e) from e


class VideoReader:
    """A video (or image) file as a lazy source of upright uint8 RGB frames, never all in memory at once.

    ``num_frames``, ``height``, ``width`` (upright: a phone clip stored landscape with a 90-degree display
    matrix reads as portrait), ``fps``, ``fps_fraction`` and ``rotation`` are known on construction (one
    decode pass without colour conversion counts the frames exactly). Iterating decodes the file again from
    the start and yields each frame ``(height, width, 3)`` in order; :meth:`read` stacks them into a
    :class:`Video`. Images are 1-frame sources. Every failure is a one-line :class:`UserError`.
    """

    def __init__(self, path: str | os.PathLike, max_frames: int | None = None):
        self.path = _check_input(path)
        self.max_frames = max_frames
        self.is_image = is_image_path(self.path)
        self._image = None
        if self.is_image:
            self._image = _read_image(self.path)
            self.num_frames, self.height, self.width = self._image.shape[:3]
            self.fps, self.fps_fraction, self.rotation = 1.0, Fraction(1), 0
            return
        n, first = 0, None
        for frame, rot in _decode(self.path, max_frames, rgb=False):
            if first is None:
                first = (frame.height, frame.width, rot)
            n += 1
        if n == 0:
            raise UserError(f"{self.path} has no frames")
        h, w, rot = first
        self.rotation = int(round((rot or 0) / 90.0)) % 4 * 90
        self.height, self.width = (w, h) if self.rotation in (90, 270) else (h, w)
        self.num_frames = n
        rate = _rate(self.path)
        self.fps = float(rate) if rate else 30.0
        self.fps_fraction = Fraction(rate) if rate else None

    def __len__(self) -> int:
        return self.num_frames

    def __iter__(self):
        if self._image is not None:
            yield self._image[0]
            return
        n = 0
        for img, _ in _decode(self.path, self.num_frames):
            if img.shape[:2] != (self.height, self.width):
                raise UserError(f"{self.path}: frame {n} is {img.shape[1]}x{img.shape[0]}, the video "
                                f"{self.width}x{self.height}; videos that change size midway are not supported")
            yield img
            n += 1
        if n != self.num_frames:
            raise UserError(f"{self.path}: decoded {n} frames on a second read, {self.num_frames} on the first")

    def read(self) -> Video:
        """All frames in memory (what :func:`read_video` returns)."""
        frames = self._image if self._image is not None else np.stack(list(self))
        return Video(frames, fps=self.fps, path=self.path, is_image=self.is_image, fps_fraction=self.fps_fraction)


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> Video:
    """The whole video in memory, upright (see :class:`VideoReader` for a stream of frames)."""
    path = _check_input(path)
    if is_image_path(path):
        return Video(_read_image(path), fps=1.0, path=path, is_image=True, fps_fraction=Fraction(1))
    frames = [img for img, _ in _decode(path, max_frames)]
    if not frames:
        raise UserError(f"{path} has no frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise UserError(f"{path}: the frame size changes midway; videos that change size are not supported")
    rate = _rate(path)
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


class _CommitOnSuccess:
    """``with`` support for the writers: ``close()`` (commit) when the block ends normally, ``abort()`` when it
    raises (nothing is left under the output name)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class VideoWriter(_CommitOnSuccess):
    """Frame-by-frame :func:`write_video`: ``with VideoWriter(dest, fps) as w: w.write(frame)`` encodes each uint8
    RGB ``(H, W, 3)`` frame as it comes (the size is the first frame's), so a long output never sits in memory
    (a GIF's frames wait for its palette, an image path takes one frame). Same formats, options, audio and
    atomicity as :func:`write_video`: the file appears under ``dest`` only when the block ends without an
    exception (:meth:`close`); :meth:`abort` (or an exception) leaves nothing."""

    def __init__(self, dest: str | os.PathLike, fps: float | Fraction, *, audio_from: str | os.PathLike | None = None,
                 crf: int = 18, lossless: bool = False):
        from m3ddm_jax.atomic import atomic_file  # noqa: PLC0415

        self.dest = check_writable(dest, lossless=lossless)
        self.ext = self.dest.suffix.lower()
        self.rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
        self.audio_from, self.crf, self.lossless = audio_from, crf, lossless
        self.count = 0
        self.size = None                      # (h, w) of the first frame
        self._held = []                       # GIF / image frames (written at close)
        self._ctx = self._tmp = self._out = self._vs = self._audio = self._audio_in = None
        self._atomic_file = atomic_file

    def _open(self, h: int, w: int) -> None:
        import av  # noqa: PLC0415

        ext, dest = self.ext, self.dest
        if ext == ".gif":
            codec, pix_fmt, options = "gif", "pal8", {}
        elif ext == ".webm":
            codec, pix_fmt = "libvpx-vp9", ("gbrp" if self.lossless else "yuv420p")
            options = {"lossless": "1"} if self.lossless else {"crf": str(self.crf), "b": "0"}
        else:
            codec, pix_fmt = ("libx264rgb", "rgb24") if self.lossless else ("libx264", "yuv420p")
            options = {"crf": "0" if self.lossless else str(self.crf), "preset": "medium"}
        self._even = pix_fmt == "yuv420p"
        if self._even:
            h, w = h // 2 * 2, w // 2 * 2
            if h == 0 or w == 0:
                raise UserError(f"cannot write {dest}: a {self.size[1]}x{self.size[0]} video is too small for yuv420p")
        self._audio_in = None if ext == ".gif" else _open_audio(self.audio_from)
        self._ctx = self._atomic_file(dest)
        self._tmp = self._ctx.__enter__()
        self._out = av.open(str(self._tmp), mode="w", format=VIDEO_WRITE[ext][0])
        vs = self._out.add_stream(codec, rate=self.rate)
        vs.width, vs.height = w, h
        vs.pix_fmt = pix_fmt
        vs.options = options
        self._vs = vs
        self._audio = _AudioTrack(self._out, self._audio_in, ext) if self._audio_in is not None else None

    def _encode(self, vf) -> None:
        vf.pts = self._pts
        self._pts += 1
        try:
            for packet in self._vs.encode(vf):
                self._out.mux(packet)
        except OSError as e:  # a full disk: one line naming dest; the temporary goes with abort()
            from m3ddm_jax.atomic import WriteError, reason  # noqa: PLC0415

            raise WriteError(self.dest, reason(e)) from e

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 RGB ``(H, W, 3)`` frame (every frame the first one's size)."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"VideoWriter needs uint8 (H, W, 3) frames, got {frame.dtype} {frame.shape}")
        if self.size is None:
            self.size = frame.shape[:2]
        elif frame.shape[:2] != self.size:
            raise ValueError(f"frame {self.count} is {frame.shape[:2]}, the video {self.size}")
        self.count += 1
        if self.ext in IMAGE_EXTS:
            check_writable(self.dest, num_frames=self.count, lossless=self.lossless)
            self._held.append(frame)
            return
        if self.ext == ".gif":
            self._held.append(frame)
            return
        if self._out is None:
            self._open(*self.size)
            self._pts = 0
        import av  # noqa: PLC0415

        if self._even:
            frame = frame[:self._vs.height, :self._vs.width]
        self._encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))

    def close(self) -> Path:
        """Finish the file and move it into place; returns ``dest``."""
        if self.count == 0:
            raise ValueError("VideoWriter got no frames")
        try:
            if self.ext in IMAGE_EXTS:
                import cv2  # noqa: PLC0415

                ok, buf = cv2.imencode(self.ext, np.ascontiguousarray(self._held[0][:, :, ::-1]))
                if not ok:
                    raise UserError(f"cannot encode {self.dest} as {self.ext}")
                with self._atomic_file(self.dest) as tmp:
                    tmp.write_bytes(buf.tobytes())
                return self.dest
            if self.ext == ".gif":
                self._open(*self.size)
                self._pts = 0
                for vf in _gif_frames(np.stack(self._held), self.rate):
                    self._encode(vf)
                self._held = []
            for packet in self._vs.encode():
                self._out.mux(packet)
            if self._audio is not None:
                self._audio.mux(self._out, self.count / float(self.rate))
            self._out.close()
            self._out = None
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)  # fsync + rename into place
            return self.dest
        except OSError as e:  # a full disk surfacing at the flush or the trailer: one line naming dest
            from m3ddm_jax.atomic import WriteError, reason  # noqa: PLC0415

            self.abort()
            raise WriteError(self.dest, reason(e)) from e
        except BaseException:
            self.abort()
            raise
        finally:
            self._close_audio()

    def abort(self) -> None:
        """Drop everything written so far; ``dest`` stays as it was."""
        if self._out is not None:
            try:
                self._out.close()
            except Exception:  # noqa: BLE001  the temporary is removed below either way
                pass
            self._out = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            try:  # the temporary is removed (see m3ddm_jax.atomic.atomic_file)
                ctx.__exit__(UserError, UserError("aborted"), None)
            except Exception:  # noqa: BLE001
                pass
        self._close_audio()
        self._held = []

    def _close_audio(self) -> None:
        if self._audio_in is not None:
            self._audio_in.close()
            self._audio_in = None


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
    :mod:`m3ddm_jax.atomic`): no partial file on any failure; the file gets the user's umask. Frame by frame:
    :class:`VideoWriter`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"write_video needs uint8 (F, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    dest = check_writable(dest, num_frames=frames.shape[0], lossless=lossless)
    with VideoWriter(dest, fps, audio_from=audio_from, crf=crf, lossless=lossless) as w:
        for f in frames:
            w.write(f)
    return dest


class PngFramesWriter(_CommitOnSuccess):
    """Frame-by-frame :func:`write_frames_png`: ``with PngFramesWriter(folder) as w: w.write(frame)``; the frames
    go to a temporary dot-folder that replaces ``folder`` when the block ends without an exception."""

    def __init__(self, folder: str | os.PathLike, prefix: str = "frame"):
        from m3ddm_jax.atomic import new_dir  # noqa: PLC0415

        self.folder = check_frames_folder(folder, prefix)
        self.prefix = prefix
        self.count = 0
        self.tmp = new_dir(self.folder)

    def write(self, frame: np.ndarray) -> None:
        import cv2  # noqa: PLC0415

        from m3ddm_jax.atomic import reason  # noqa: PLC0415

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(np.asarray(frame)[:, :, ::-1]))
        if not ok:
            raise UserError(f"cannot encode frame {self.count} as PNG")
        try:
            (self.tmp / f"{self.prefix}_{self.count:05d}.png").write_bytes(buf.tobytes())
        except OSError as e:
            raise UserError(f"cannot write {self.folder}: {reason(e)}") from e
        self.count += 1

    def close(self) -> Path:
        from m3ddm_jax.atomic import default_mode, new_dir, reason, remove  # noqa: PLC0415

        folder, tmp = self.folder, self.tmp
        old = None
        try:
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

    def abort(self) -> None:
        from m3ddm_jax.atomic import remove  # noqa: PLC0415

        remove(self.tmp)


def write_frames_png(folder: str | os.PathLike, frames: np.ndarray, prefix: str = "frame") -> Path:
    """One lossless PNG per frame (``frame_00000.png``...), written into a temporary dot-folder then renamed.

    ``folder`` may exist when it is empty or holds only ``<prefix>_NNNNN.png`` files (a previous run's frames,
    replaced as a whole); a folder holding anything else is refused (see :func:`check_frames_folder`). Frame by
    frame: :class:`PngFramesWriter`."""
    with PngFramesWriter(folder, prefix) as w:
        for f in frames:
            w.write(f)
    return w.folder


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
    if frames is None:
        raise ValueError("this result's frames went to a sink (sink=...) and were not kept; write them with the "
                         "sink (e.g. VideoWriter) instead of export_to_video")
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
