"""DAVIS and DAVIS Static for the outpainting evaluation (spec section 7).

Sources (all give uint8 RGB frames ``(N, H, W, 3)`` and a frame rate):

* :class:`DavisFolder` - a local DAVIS download: ``ROOT/JPEGImages/<resolution>/<sequence>/*.jpg``
  (``480p`` by default; ``1080p`` / ``Full-Resolution`` when present). DAVIS has no frame rate; the
  reference muxes its JPEGs at 24 fps, so 24 is used.
* :class:`VideoFolder` - a folder of video files; the sequence name is the file stem.
* :class:`TfdsDavis` - TFDS ``davis/480p`` (DAVIS-2017 train + validation, which hold all 50 DAVIS-2016
  sequences), read with ``tfds.data_source`` (array_record, random access, no TensorFlow needed).
  ``tensorflow-datasets`` is an optional dependency imported only here.

Sequence lists: :data:`DAVIS2016` (the 50 sequences of the paper: 30 train + 20 val, 3455 frames),
``"all"`` (everything the source has), explicit names, or ``"auto"``: the source's ``default_sequences``
(``davis2016`` for DAVIS folders and TFDS, ``all`` for a folder of videos).

Evaluation frames (spec section 7.2): :func:`gt_size` gives the target box (``S x round(S/r)`` for a
ratio ``r >= 1``, each side floored to a multiple of 8: 256x144 for 16:9); :func:`prepare_gt` resizes by
``max(W_t/W, H_t/H)`` (bilinear as the reference, or area) and centre-crops to it; :func:`static_video`
repeats frame 0 (DAVIS Static); :func:`masked_input` crops the kept centre with
:func:`m3ddm_jax.masks.eval_keep_box` (0.25 on 256x144 -> 192x144, 0.66 -> 88x144); :func:`jpeg_roundtrip`
is the reference's JPEG save/load.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Protocol as _Proto

import cv2
import numpy as np

from m3ddm_jax.errors import ConfigError, UserError
from m3ddm_jax.masks import eval_keep_box

DAVIS_FPS = 24.0
DAVIS2016_TRAIN = (
    "bear", "bmx-bumps", "boat", "breakdance-flare", "bus", "car-turn", "dance-jump", "dog-agility",
    "drift-turn", "elephant", "flamingo", "hike", "hockey", "horsejump-low", "kite-walk", "lucia",
    "mallard-fly", "mallard-water", "motocross-bumps", "motorbike", "paragliding", "rhino", "rollerblade",
    "scooter-gray", "soccerball", "stroller", "surf", "swing", "tennis", "train",
)
DAVIS2016_VAL = (
    "blackswan", "bmx-trees", "breakdance", "camel", "car-roundabout", "car-shadow", "cows", "dance-twirl",
    "dog", "drift-chicane", "drift-straight", "goat", "horsejump-high", "kite-surf", "libby", "motocross-jump",
    "paragliding-launch", "parkour", "scooter-black", "soapbox",
)
DAVIS2016 = DAVIS2016_TRAIN + DAVIS2016_VAL
NAMED_LISTS = {"davis2016": DAVIS2016, "davis2016-train": DAVIS2016_TRAIN, "davis2016-val": DAVIS2016_VAL}
VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
RESOLUTION_DIRS = {"480p": ("480p",), "1080p": ("1080p", "Full-Resolution"), "full": ("Full-Resolution", "1080p")}


class VideoSource(_Proto):
    label: str
    default_sequences: str  # what data.sequences=auto selects

    def names(self) -> list[str]: ...

    def load(self, name: str) -> tuple[np.ndarray, float]: ...


def _read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"cannot read image {path}")
    return img[:, :, ::-1]


class DavisFolder:
    """``ROOT/JPEGImages/<resolution>/<sequence>/*.jpg`` (ROOT may also be a folder holding ``DAVIS/``)."""

    label = "DAVIS"
    default_sequences = "davis2016"

    def __init__(self, root: str | os.PathLike, resolution: str = "480p", fps: float = DAVIS_FPS):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"DAVIS folder not found: {root}")
        if not (root / "JPEGImages").is_dir() and (root / "DAVIS" / "JPEGImages").is_dir():
            root = root / "DAVIS"
        base = root / "JPEGImages"
        if not base.is_dir():
            raise UserError(f"{root} is not a DAVIS folder (no JPEGImages/ inside)")
        subdirs = RESOLUTION_DIRS.get(resolution, (resolution,))
        found = next((base / s for s in subdirs if (base / s).is_dir()), None)
        if found is None:
            have = sorted(p.name for p in base.iterdir() if p.is_dir())
            raise UserError(f"{base} has no {resolution} frames (found: {', '.join(have) or 'nothing'})")
        self.root, self.frames_dir, self.fps = root, found, float(fps)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.frames_dir.iterdir() if p.is_dir())

    def load(self, name: str) -> tuple[np.ndarray, float]:
        d = self.frames_dir / name
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if d.is_dir() else []
        if not files:
            raise UserError(f"no frames for sequence {name!r} in {d}")
        frames = [_read_rgb(f) for f in files]
        if len({f.shape for f in frames}) != 1:
            raise UserError(f"frames of {d} differ in size")
        return np.stack(frames), self.fps


class VideoFolder:
    """A folder of videos; names are file stems. All of them are scored by default."""

    default_sequences = "all"

    def __init__(self, root: str | os.PathLike):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"video folder not found: {root}")
        self.root = root
        self.label = root.name
        self._files = {p.stem: p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_EXTS}
        if not self._files:
            raise UserError(f"no videos ({', '.join(sorted(VIDEO_EXTS))}) in {root}")

    def names(self) -> list[str]:
        return sorted(self._files)

    def load(self, name: str) -> tuple[np.ndarray, float]:
        from m3ddm_jax.video import read_video  # noqa: PLC0415

        v = read_video(self._files[name])
        return v.frames, v.fps


def _as_str(x) -> str:
    x = np.asarray(x).reshape(()).item() if not isinstance(x, (str, bytes)) else x
    return x.decode() if isinstance(x, bytes) else str(x)


class TfdsDavis:
    """TFDS ``davis/480p`` through ``tfds.data_source`` (array_record; no TensorFlow needed)."""

    label = "DAVIS"
    default_sequences = "davis2016"

    def __init__(self, name: str = "davis/480p", splits=("train", "validation"), data_dir: str | None = None,
                 fps: float = DAVIS_FPS):
        try:
            import tensorflow_datasets as tfds  # noqa: PLC0415
        except ImportError as e:
            raise UserError("no --config.data.dir given and tensorflow-datasets is not installed "
                            "(pip install tensorflow-datasets, or pass a DAVIS folder with --config.data.dir)") from e
        self.fps = float(fps)
        self._sources = []
        for split in splits:
            try:
                src = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
            except Exception as e:  # not prepared / not found / wrong file format
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise UserError(f"cannot open TFDS {name} split {split!r}"
                                f"{' in ' + str(data_dir) if data_dir else ''}: {first}") from e
            self._sources.append(src)
        self._index: dict[str, tuple[int, int]] | None = None

    def _build_index(self) -> dict[str, tuple[int, int]]:
        if self._index is None:
            self._index = {}
            for si, src in enumerate(self._sources):
                for i in range(len(src)):
                    self._index.setdefault(_as_str(src[i]["metadata"]["video_name"]), (si, i))
        return self._index

    def names(self) -> list[str]:
        return sorted(self._build_index())

    def load(self, name: str) -> tuple[np.ndarray, float]:
        si, i = self._build_index()[name]
        frames = np.asarray(self._sources[si][i]["video"]["frames"])
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise UserError(f"TFDS record {name!r} has frames of shape {frames.shape}")
        return frames.astype(np.uint8), self.fps


def open_source(source: str = "auto", path: str | None = None, *, resolution: str = "480p",
                tfds_name: str = "davis/480p", tfds_splits=("train", "validation"), fps: float = DAVIS_FPS):
    """``source``: ``auto`` (a DAVIS folder or a folder of videos when ``path`` is given, else TFDS),
    ``davis``, ``videos`` or ``tfds`` (``path`` = the TFDS data dir, optional)."""
    path = str(path or "").strip()
    if source == "auto":
        if not path:
            source = "tfds"
        else:
            p = Path(path).expanduser()
            if not p.exists():
                raise UserError(f"dataset folder not found: {p}")
            source = "davis" if ((p / "JPEGImages").is_dir() or (p / "DAVIS" / "JPEGImages").is_dir()) else "videos"
    if source == "davis":
        if not path:
            raise UserError("a DAVIS folder is needed: --config.data.dir=PATH")
        return DavisFolder(path, resolution, fps)
    if source == "videos":
        if not path:
            raise UserError("a folder of videos is needed: --config.data.dir=PATH")
        return VideoFolder(path)
    if source == "tfds":
        if isinstance(tfds_splits, str):
            tfds_splits = tuple(s.strip() for s in tfds_splits.split(",") if s.strip())
        return TfdsDavis(tfds_name, tfds_splits, path or None, fps)
    raise ConfigError(f"data.source must be auto, davis, videos or tfds, got {source!r}")


def resolve_sequences(spec, available: list[str], default: str = "davis2016") -> list[str]:
    """A named list (``davis2016``, ``davis2016-train``, ``davis2016-val``), ``all``, ``auto`` (= ``default``:
    the source's ``default_sequences``), or names (comma-separated string or a sequence). Every name must exist
    in ``available``."""
    if isinstance(spec, str):
        key = spec.strip()
        if key in ("auto", ""):
            key = default
        if key == "all":
            if not available:
                raise UserError("the dataset holds no sequences")
            return list(available)
        names = list(NAMED_LISTS[key]) if key in NAMED_LISTS else [s.strip() for s in key.split(",") if s.strip()]
    else:
        key = None
        names = [str(s).strip() for s in spec]
    if not names:
        raise UserError("no sequences selected (data.sequences is empty)")
    have = set(available)
    missing = [n for n in names if n not in have]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        listed = f" (data.sequences={key} lists them)" if key in NAMED_LISTS else ""
        raise UserError(f"unknown sequence name(s) {shown}{listed}: not in the dataset ({len(available)} sequences, "
                        f"e.g. {', '.join(available[:3]) or 'none'}); --config.data.sequences=all scores every one")
    return list(dict.fromkeys(names))


# -- evaluation frames -------------------------------------------------------------------------------------

def gt_size(ratio: str | Fraction, output_size: int = 256) -> tuple[int, int]:
    """``(H_t, W_t)`` of the ground-truth box: long side ``output_size``, the other ``round``ed, both
    floored to multiples of 8 (the reference's rule)."""
    from m3ddm_jax.outpaint.geometry import parse_ratio  # noqa: PLC0415

    r = parse_ratio(ratio) if isinstance(ratio, str) else Fraction(ratio)
    if r >= 1:
        w, h = output_size, round(output_size / r)
    else:
        h, w = output_size, round(output_size * r)
    h, w = int(h) // 8 * 8, int(w) // 8 * 8
    if h < 8 or w < 8:
        raise ConfigError(f"target {ratio} at output size {output_size} is too small")
    return h, w


RESIZE = {"bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def prepare_gt(frames: np.ndarray, size_hw: tuple[int, int], resize: str = "bilinear") -> np.ndarray:
    """Resize by ``max(W_t/W, H_t/H)`` to ``(int(W*s), int(H*s))`` and centre-crop to ``size_hw``."""
    if resize not in RESIZE:
        raise ConfigError(f"resize must be one of {tuple(RESIZE)}, got {resize!r}")
    th, tw = size_hw
    n, h, w = frames.shape[:3]
    s = max(tw / w, th / h)
    rw, rh = max(tw, int(w * s)), max(th, int(h * s))  # never below the box (float rounding)
    out = np.empty((n, th, tw, 3), np.uint8)
    top, left = (rh - th) // 2, (rw - tw) // 2
    for i, f in enumerate(frames):
        r = f if (rh, rw) == (h, w) else cv2.resize(np.ascontiguousarray(f), (rw, rh), interpolation=RESIZE[resize])
        out[i] = r[top:top + th, left:left + tw]
    return out


def static_video(frames: np.ndarray) -> np.ndarray:
    """DAVIS Static: every frame replaced by frame 0 (same length)."""
    return np.ascontiguousarray(np.repeat(frames[:1], len(frames), axis=0))


def masked_input(gt: np.ndarray, crop_ratio: float, axis: str = "horizontal") -> np.ndarray:
    """The model input: the kept centre of the ground truth (``crop_ratio`` of the width/height outpainted)."""
    top, left, h, w = eval_keep_box(gt.shape[1], gt.shape[2], crop_ratio, axis)
    return np.ascontiguousarray(gt[:, top:top + h, left:left + w])


def jpeg_roundtrip(frames: np.ndarray, quality: int | None) -> np.ndarray:
    """Encode/decode every RGB frame as JPEG (OpenCV/libjpeg) at ``quality``; ``None`` returns the input."""
    if not quality:
        return frames
    out = np.empty_like(frames)
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    for i, f in enumerate(frames):
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(f[:, :, ::-1]), params)
        if not ok:
            raise UserError("JPEG encoding failed")
        out[i] = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return out
