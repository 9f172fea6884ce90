"""Training data: a folder of videos -> batches of clips, global frames and frame rates, with grain.

Layout: ``DIR/train/**`` and ``DIR/val/**`` (found recursively, each file once - the reference lists nested
files several times, spec 9.8); if ``DIR/train`` does not exist the whole of ``DIR`` (minus ``DIR/val``) is the
training split. Extensions: :data:`VIDEO_EXTS`.

One element (spec 6.2-6.3, with bug 9.1 fixed):

* stride ``k ~ U{1..min(max_stride, (N-1) // (F-1))}`` (the reference: ``U{1..min(30, N // 15)}``) and a start
  frame ``s ~ U{0..N-1-(F-1)k}``, so every clip holds ``F`` distinct frames ``s, s+k, ...`` (the reference draws
  the start in frame units but indexes the strided list with it: most clips end in copies of the last
  frame);
* one torchvision-style ``RandomResizedCrop`` (scale (0.08, 1), ratio (3/4, 4/3)) shared by the clip's
  frames, resized to ``size x size`` (area interpolation when shrinking, bilinear when enlarging);
* ``G`` global frames at ``linspace(0, N-1, G)`` over the whole video, the full frame resized to
  ``global_size`` (aspect not kept, as the reference) or, with ``global_crop``, the clip's crop box;
* ``fps = floor(video_fps / k)`` (the reference's ``fps // k``).

The global frames make every element decode its video up to the last frame. With ``data.cache_dir`` the
first element of a video also writes the video's index (frame timestamps, keyframes, the resized global
frames; :mod:`m3ddm_jax.data.video_index`) and later elements of that video decode only their clip, from the
keyframe before it; the elements are the same, bit for bit.

Videos that cannot be decoded or are shorter than ``min_frames`` are *skipped*: the element is drawn from
another file instead (deterministically, from the element's own RNG) and carries the ids of the skipped files
(``skipped`` field, ``-1`` padded) so the trainer counts and names them. A run never trains on a dummy
element or returns a silent zero loss.

Decoding happens in grain worker processes (``worker_count``); the iterator state (sampler position) is
checkpointed with the model. Random draws come from grain's per-record RNG (seeded by ``seed`` and the
record's position in the epoch-extended index stream), so the data order and augmentations do not depend
on the number of workers and are reproduced exactly after a resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import grain.python as grain
import numpy as np

from m3ddm_jax.data.video_index import IndexCache, Recorder, VideoIndex, decode_frames, decode_indexed
from m3ddm_jax.errors import ConfigError, UserError

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v")


def find_videos(root: str | os.PathLike, split: str | None = None) -> list[str]:
    """Sorted, de-duplicated video paths under ``root/split`` (``root`` itself minus ``root/val`` when
    ``split == 'train'`` and there is no ``root/train``). Missing folder -> ``[]``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"video folder not found: {root}")
    base, exclude = root, None
    if split:
        if (root / split).is_dir():
            base = root / split
        elif split == "train":
            exclude = (root / "val").resolve()
        else:
            return []
    found = set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        dirnames.sort()
        if exclude is not None and Path(dirpath).resolve() == exclude:
            dirnames[:] = []
            continue
        for name in filenames:
            if name.lower().endswith(VIDEO_EXTS) and not name.startswith("."):
                found.add(os.path.join(dirpath, name))
    return sorted(found)


class VideoFiles:
    """grain random-access source over video paths; the element is the path's index (decoding is done by
    :class:`SampleClip`, in the workers). Its ``repr`` names the folder and a digest of the file list, so
    grain can check on restore that the iterator state belongs to the same data."""

    def __init__(self, paths: Sequence[str], name: str = "videos"):
        self.paths = list(paths)
        self.name = name
        self._digest = hashlib.sha1("\n".join(self.paths).encode()).hexdigest()[:12]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        return int(index)

    def __repr__(self) -> str:
        return f"VideoFiles(name={self.name!r}, n={len(self.paths)}, digest={self._digest})"


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    num_frames: int = 16
    num_global_frames: int = 16
    size: int = 128
    global_size: int = 128
    max_stride: int = 30
    min_frames: int = 16
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    global_crop: bool = False
    max_retries: int = 8
    cache_dir: str = ""  # a folder for per-video indexes (m3ddm_jax.data.video_index); "" = none

    def validate(self) -> None:
        if self.num_frames < 1 or self.num_global_frames < 1:
            raise ConfigError("data.num_frames and data.num_global_frames must be positive")
        if self.size < 8 or self.global_size < 8:
            raise ConfigError("data.size and data.global_size must be at least 8 pixels")
        if self.min_frames < self.num_frames:
            raise ConfigError(f"data.min_frames ({self.min_frames}) must be >= data.num_frames ({self.num_frames})")
        if self.max_stride < 1:
            raise ConfigError("data.max_stride must be >= 1")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.cache_dir:
            try:
                Path(self.cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"data.cache_dir {self.cache_dir}: {e.strerror or e}") from e
            if not os.access(Path(self.cache_dir).expanduser(), os.W_OK):
                raise ConfigError(f"data.cache_dir {self.cache_dir} is not writable")


# -- decoding -------------------------------------------------------------------------------------------

class BadVideo(Exception):
    pass


def _container_frame_count(path: str) -> tuple[int, float]:
    import av  # noqa: PLC0415

    with av.open(path) as c:
        if not c.streams.video:
            raise BadVideo("no video stream")
        s = c.streams.video[0]
        rate = s.average_rate or s.guessed_rate or s.base_rate
        return int(s.frames or 0), float(rate) if rate else 30.0


def sample_indices(n: int, fps: float, spec: ClipSpec, rng: np.random.Generator):
    """``(clip indices (F,), global indices (G,), stride, fps_cond)`` for a video of ``n`` frames."""
    f = spec.num_frames
    kmax = max(1, min(spec.max_stride, (n - 1) // max(f - 1, 1))) if f > 1 else 1
    k = int(rng.integers(1, kmax + 1))
    span = (f - 1) * k
    start = int(rng.integers(0, n - span))  # 0 .. n-1-span
    clip = start + k * np.arange(f)
    glob = np.linspace(0, n - 1, spec.num_global_frames).astype(np.int64)
    return clip, glob, k, float(math.floor(fps / k))


def random_resized_crop_box(h: int, w: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, height, width)``."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2  # noqa: PLC0415

    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if (h > size and w > size) else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def _draws(index: VideoIndex, spec: ClipSpec, rng: np.random.Generator):
    """:func:`load_clip`'s random draws, made from the index: the same draws in the same order, or a
    :class:`BadVideo` where :func:`load_clip` raises one; None when the index cannot tell (not enough of the
    video was decoded on the first visit)."""
    if index.n_meta < spec.min_frames:  # load_clip decoded everything and counted
        if not index.eof:
            return None
        if index.n_known < spec.min_frames:
            raise BadVideo(f"{index.n_known} frames < min_frames {spec.min_frames}")
        return sample_indices(index.n_known, index.fps, spec, rng)
    d = sample_indices(index.n_meta, index.fps, spec, rng)
    if max(int(d[0].max()), int(d[1].max())) < index.n_known:
        return d
    if not index.eof:
        return None
    if index.n_known < spec.min_frames:  # the container over-stated its length
        raise BadVideo(f"{index.n_known} frames < min_frames {spec.min_frames}")
    return sample_indices(index.n_known, index.fps, spec, rng)


def _from_index(path: str, index: VideoIndex, spec: ClipSpec, rng: np.random.Generator) -> dict | None:
    d = _draws(index, spec, rng)
    if d is None:
        return None
    clip_idx, glob_idx, _, fps_cond = d
    stored = None if spec.global_crop else index.global_frames
    wanted = sorted(set(clip_idx.tolist()) | (set() if stored is not None else set(glob_idx.tolist())))
    table = decode_indexed(path, index, wanted)
    if table is None:  # timestamps that do not identify frames: decode from the start
        got, _ = decode_frames(path, wanted)
        if len(got) != len(wanted):
            return None
        table = dict(zip(wanted, got))
    return _assemble(table, clip_idx, glob_idx, fps_cond, spec, rng, stored)


def _assemble(table: dict, clip_idx, glob_idx, fps_cond: float, spec: ClipSpec, rng: np.random.Generator,
              glob: np.ndarray | None = None) -> dict:
    h, w = table[int(clip_idx[0])].shape[:2]
    top, left, ch, cw = random_resized_crop_box(h, w, spec.crop_scale, spec.crop_ratio, rng)
    clip = np.stack([resize(table[int(i)][top:top + ch, left:left + cw], spec.size) for i in clip_idx])
    if spec.global_crop:
        glob = np.stack([resize(table[int(i)][top:top + ch, left:left + cw], spec.global_size) for i in glob_idx])
    elif glob is None:
        glob = np.stack([resize(table[int(i)], spec.global_size) for i in glob_idx])
    return {"frames": clip.astype(np.uint8), "global_frames": glob.astype(np.uint8),
            "fps": np.float32(fps_cond)}


def load_clip(path: str, spec: ClipSpec, rng: np.random.Generator) -> dict:
    """One training element from one video (raises :class:`BadVideo`). With ``spec.cache_dir`` the video's
    index (:mod:`m3ddm_jax.data.video_index`) is used when present and written when not; the element is
    the same either way."""
    cache = IndexCache(spec.cache_dir) if spec.cache_dir else None
    if cache is not None:
        index = cache.load(path, spec.num_global_frames, spec.global_size)
        if index is not None:
            state = rng.bit_generator.state
            try:
                el = _from_index(path, index, spec, rng)
            except BadVideo:
                raise
            except Exception as e:  # noqa: BLE001 - PyAV errors: decode from the start below
                log.debug("video index of %s not usable (%s)", path, e)
                el = None
            if el is not None:
                return el
            rng.bit_generator.state = state  # the same draws again, the plain way
            cache = None  # keep the entry: it answers other draws of this video
    record = Recorder() if cache is not None else None
    try:
        el = _load_clip(path, spec, rng, record)
    except BadVideo:
        if record is not None and record.eof:  # too short: remembered, so later draws skip it at once
            cache.save(path, spec.num_global_frames, spec.global_size, record.index())
        raise
    if record is not None:
        index = record.index()
        index.global_frames = None if spec.global_crop else el["global_frames"]
        cache.save(path, spec.num_global_frames, spec.global_size, index)
    return el


def _load_clip(path: str, spec: ClipSpec, rng: np.random.Generator, record: Recorder | None) -> dict:
    """:func:`load_clip` without an index: decode from the start up to the last wanted frame (``record``
    notes the container's frame count and rate and the first decoding pass)."""
    try:
        n, fps = _container_frame_count(path)
        if record is not None:
            record.n_meta, record.fps = n, fps
        frames_all = None
        if n < spec.min_frames:  # unknown or (claimed) too short: count by decoding
            frames_all, n = decode_frames(path, None, record)
        if n < spec.min_frames:
            raise BadVideo(f"{n} frames < min_frames {spec.min_frames}")
        clip_idx, glob_idx, _, fps_cond = sample_indices(n, fps, spec, rng)
        if frames_all is None:
            wanted = sorted(set(clip_idx.tolist()) | set(glob_idx.tolist()))
            got, decoded = decode_frames(path, wanted, record)
            if len(got) != len(wanted):  # the container over-stated its length: decode everything instead
                frames_all, n = decode_frames(path, None)
                if n < spec.min_frames:
                    raise BadVideo(f"{n} frames < min_frames {spec.min_frames}")
                clip_idx, glob_idx, _, fps_cond = sample_indices(n, fps, spec, rng)
            else:
                table = dict(zip(wanted, got))
        if frames_all is not None:
            table = {i: frames_all[i] for i in set(clip_idx.tolist()) | set(glob_idx.tolist())}
    except BadVideo:
        raise
    except Exception as e:  # PyAV errors: corrupt / not a video
        raise BadVideo(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'}") from e
    return _assemble(table, clip_idx, glob_idx, fps_cond, spec, rng)


class SampleClip(grain.RandomMapTransform):
    """Index of a video -> one element; unreadable/too-short videos are replaced by other draws."""

    def __init__(self, paths: Sequence[str], spec: ClipSpec):
        self.paths = list(paths)
        self.spec = spec

    def random_map(self, index, rng: np.random.Generator):
        skipped = np.full((self.spec.max_retries + 1,), -1, np.int32)
        idx = int(index)
        for attempt in range(self.spec.max_retries + 1):
            try:
                el = load_clip(self.paths[idx], self.spec, rng)
            except BadVideo as e:
                log.info("skipping video %s: %s", self.paths[idx], e)  # the trainer names it once
                skipped[attempt] = idx
                idx = int(rng.integers(0, len(self.paths)))
                continue
            el["skipped"] = skipped
            el["index"] = np.int32(idx)
            return el
        raise UserError(f"{self.spec.max_retries + 1} videos in a row could not be read (last: {self.paths[idx]}); "
                        "check the data folder")


def make_loader(paths: Sequence[str], spec: ClipSpec, *, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, worker_count: int = 0, worker_buffer_size: int = 2,
                shard_by_process: bool = True, name: str = "train"):
    """A grain ``DataLoader`` of batches ``{frames (B,F,S,S,3) u8, global_frames (B,G,Sg,Sg,3) u8, fps (B,),
    skipped (B, R), index (B,)}``; ``batch_size`` is per process."""
    spec.validate()
    if not paths:
        raise UserError(f"no videos found for the {name} split")
    source = VideoFiles(paths, name)
    import jax  # noqa: PLC0415

    shard = (grain.ShardByJaxProcess(drop_remainder=True) if shard_by_process and jax.process_count() > 1
             else grain.NoSharding())
    sampler = grain.IndexSampler(len(source), shard_options=shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    ops = [SampleClip(source.paths, spec), grain.Batch(batch_size, drop_remainder=True)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops, worker_count=worker_count,
                            worker_buffer_size=worker_buffer_size)
