"""A per-video index for the training loader: frame timestamps, keyframes and the resized global frames.

Without it every training element decodes its video up to the last global frame (``linspace(0, N-1, G)``
spans the whole video), so the cost of a clip is the cost of the whole video. The first time a worker
loads a video it records, while decoding as before, each decoded frame's presentation timestamp and
keyframe flag, and the ``G`` global frames it resized; later elements of the same video then

* take the global frames from the index (no decoding at all for them), and
* decode only the clip: seek to the last keyframe at or before the clip's first frame and decode up to its
  last frame, mapping each decoded frame back to its index by its timestamp.

The element is the same, bit for bit, as without the index: the same random draws in the same order (the
index keeps the two frame counts the draws depend on), the same frames (checked by timestamp; a file whose
timestamps are missing or not increasing, or a seek that lands after the clip, falls back to decoding from
the start), the same resized global frames.

Entries live in ``cache_dir`` as ``.npz`` files named by a digest of the video's real path, size and
modification time and of the global-frame settings: an edited or replaced video gets a new entry, and a
damaged entry is read as missing and rewritten. Each entry holds ``G * global_size^2 * 3`` bytes of global
frames (786 KB at the paper's 16 x 128 px) plus 16 bytes per frame; with ``global_crop`` the global frames
depend on the clip's crop and are not stored (the clip is still decoded by seeking, from the keyframe before
the first global frame, so little is saved). Writing is best effort: a full or read-only disk logs one
warning per worker and training goes on without the index.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

VERSION = 1
_warned: set[str] = set()


@dataclasses.dataclass
class VideoIndex:
    """What the loader learnt about one video.

    ``n_meta``: the frame count the container states (0 when unknown); ``n_known``: frames decoded on the
    first visit, all of them when ``eof``; ``pts``/``keyframe``: per decoded frame, in decoding output
    order (``pts`` empty when the timestamps cannot identify frames); ``global_frames``: ``(G, Sg, Sg, 3)``
    uint8 or None."""
    n_meta: int
    n_known: int
    eof: bool
    fps: float
    pts: np.ndarray
    keyframe: np.ndarray
    global_frames: np.ndarray | None = None

    @property
    def seekable(self) -> bool:
        return len(self.pts) == self.n_known and self.n_known > 0


class Recorder:
    """Collects ``(pts, keyframe)`` of every decoded frame, in order (see :func:`decode_frames`), and the
    container's stated frame count and rate (``n_meta``, ``fps``, set by the loader)."""

    def __init__(self):
        self.pts: list = []
        self.key: list[bool] = []
        self.eof = False
        self.n_meta, self.fps = 0, 30.0

    def add(self, frame) -> None:
        self.pts.append(frame.pts)
        self.key.append(bool(frame.key_frame))

    def index(self) -> VideoIndex:
        pts = self.pts
        ok = all(p is not None for p in pts) and all(b > a for a, b in zip(pts, pts[1:]))
        return VideoIndex(n_meta=int(self.n_meta), n_known=len(pts), eof=self.eof, fps=float(self.fps),
                          pts=np.asarray(pts if ok else [], np.int64), keyframe=np.asarray(self.key, bool))


def decode_frames(path: str, indices: Sequence[int] | None, record: Recorder | None = None
                  ) -> tuple[list[np.ndarray], int]:
    """``(frames at `indices` (all frames if None), frames decoded)``, decoding sequentially from the start
    and stopping after the last wanted index. ``record`` notes each decoded frame's timestamp and keyframe
    flag, and whether decoding reached the end of the stream."""
    import av  # noqa: PLC0415

    want = None if indices is None else set(int(i) for i in indices)
    last = None if indices is None else max(indices)
    got: dict[int, np.ndarray] = {}
    out_all = []
    n = 0
    with av.open(path) as c:
        for i, frame in enumerate(c.decode(c.streams.video[0])):
            n = i + 1
            if record is not None:
                record.add(frame)
            if want is None:
                out_all.append(frame.to_ndarray(format="rgb24"))
            elif i in want:
                got[i] = frame.to_ndarray(format="rgb24")
                if i == last:
                    break
        else:
            if record is not None:
                record.eof = True
    if want is None:
        return out_all, n
    return [got[i] for i in indices if i in got], n


def decode_indexed(path: str, index: VideoIndex, indices: Sequence[int]) -> dict[int, np.ndarray] | None:
    """Frames at ``indices`` (all ``< index.n_known``) by seeking to the last keyframe at or before the first
    of them; None when the index cannot place the decoded frames (the caller then decodes from the start)."""
    import av  # noqa: PLC0415

    if not index.seekable:
        return None
    want = set(int(i) for i in indices)
    first, last = min(want), max(want)
    keys = np.flatnonzero(index.keyframe[:first + 1])
    start = int(keys[-1]) if len(keys) else 0
    where = {int(p): i for i, p in enumerate(index.pts)}
    got: dict[int, np.ndarray] = {}
    with av.open(path) as c:
        s = c.streams.video[0]
        if start > 0:
            c.seek(int(index.pts[start]), stream=s, backward=True, any_frame=False)
        begun = False
        for frame in c.decode(s):
            i = where.get(frame.pts) if frame.pts is not None else None
            if i is None:
                return None
            if not begun:
                if i > first:  # the demuxer's keyframe is after the clip: cannot trust the seek
                    return None
                begun = True
            if i > last:
                return None
            if i in want and i not in got:
                got[i] = frame.to_ndarray(format="rgb24")
                if len(got) == len(want):
                    return got
    return None


class IndexCache:
    """The ``.npz`` entries of one cache folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"IndexCache({str(self.root)!r})"

    def entry(self, path: str, num_global: int, global_size: int) -> Path | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = f"v{VERSION}|{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{num_global}|{global_size}"
        return self.root / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"

    def load(self, path: str, num_global: int, global_size: int) -> VideoIndex | None:
        f = self.entry(path, num_global, global_size)
        if f is None or not f.exists():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                n_meta, n_known, eof = (int(x) for x in z["counts"])
                g = z["global_frames"] if "global_frames" in z.files else None
                if g is not None and g.shape[:1] != (num_global,):
                    return None
                idx = VideoIndex(n_meta=n_meta, n_known=n_known, eof=bool(eof), fps=float(z["fps"]),
                                 pts=z["pts"], keyframe=z["keyframe"], global_frames=g)
            if len(idx.keyframe) != idx.n_known or len(idx.pts) not in (0, idx.n_known):
                return None
            return idx
        except Exception as e:  # a damaged entry (a killed writer on another file system, a full disk): rewrite
            log.debug("video index %s unreadable (%s): rebuilding it", f, e)
            return None

    def save(self, path: str, num_global: int, global_size: int, index: VideoIndex) -> None:
        f = self.entry(path, num_global, global_size)
        if f is None:
            return
        tmp = f.with_name(f".{f.stem}.{os.getpid()}.tmp.npz")
        arrays = dict(counts=np.asarray([index.n_meta, index.n_known, int(index.eof)], np.int64),
                      fps=np.float64(index.fps), pts=index.pts, keyframe=index.keyframe)
        if index.global_frames is not None:
            arrays["global_frames"] = index.global_frames
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **arrays)
            os.replace(tmp, f)
        except OSError as e:
            if str(self.root) not in _warned:
                _warned.add(str(self.root))
                log.warning("cannot write the video index to %s (%s): going on without it", self.root,
                            e.strerror or e)
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass
