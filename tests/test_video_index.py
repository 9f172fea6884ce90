"""The training loader's per-video index (``data.cache_dir``): the same elements, bit for bit and draw for draw,
as without it, from much less decoding.

Real files in several codecs and containers (H.264 with B-frames and short or long GOPs, HEVC, VP9, FFV1,
MPEG-4 in AVI, variable frame rate in MKV), each loaded for many random draws three ways: without the index,
on the first visit (which writes it) and from the index. The elements and the random generator's state
after each load must be identical; from the index the global frames are never decoded and the clip is
decoded from the keyframe before it (counted through a wrapped ``av.open``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import av
import numpy as np
import pytest

from m3ddm_jax.data import video_index
from m3ddm_jax.data.video_folder import BadVideo, ClipSpec, load_clip, make_loader
from tests.media import encode

N = 48  # frames per test video
SPEC = ClipSpec(num_frames=4, num_global_frames=4, size=24, global_size=16, min_frames=8, max_stride=4)

# name -> (file name, encode kwargs, keyframe interval the index must see, or None when not checked)
VIDEOS = {
    "h264_bframes_gop8": ("a.mp4", dict(codec="libx264", options={"crf": "20", "g": "8", "bf": "2",
                                                                  "keyint_min": "8", "sc_threshold": "0"}), 8),
    "h264_long_gop": ("b.mp4", dict(codec="libx264", options={"crf": "20"}), None),
    "hevc_gop12": ("c.mp4", dict(codec="libx265", options={"x265-params": "keyint=12:min-keyint=12:scenecut=0:"
                                                           "log-level=none:pools=none:frame-threads=1"}), 12),
    "vp9_gop10": ("d.webm", dict(codec="libvpx-vp9", options={"g": "10", "deadline": "realtime",
                                                              "cpu-used": "8"}), None),
    "ffv1_gop6": ("e.mkv", dict(codec="ffv1", options={"g": "6"}), 6),  # non-key frames carry coder state
    "mpeg4_avi": ("f.avi", dict(codec="mpeg4", options={"g": "6", "qscale": "3"}), None),
    "h264_vfr_mkv": ("g.mkv", dict(codec="libx264", options={"crf": "20", "g": "6"},
                                   pts_ms=[int(i * 40 + (i % 3) * 7) for i in range(N)]), None),
}
# libx265 corrupts the heap on frames smaller than its 64-px CTU (see test_inputs): HEVC at 64x96
SIZES = {"hevc_gop12": (64, 96)}


def _frames(n: int, seed: int, h: int = 32, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tex = rng.integers(40, 220, (h * 2, w * 2, 3), dtype=np.uint8)
    out = np.stack([tex[(2 * i) % h:(2 * i) % h + h, (3 * i) % w:(3 * i) % w + w] for i in range(n)])
    out[:, 4:10, :, :] = (np.arange(n) * 5 % 256)[:, None, None, None]  # a per-frame stripe: frames differ
    return np.ascontiguousarray(out)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("index_videos")
    out = {}
    for k, (name, (fname, kw, _)) in enumerate(VIDEOS.items()):
        try:
            out[name] = encode(d / fname, _frames(N, k, *SIZES.get(name, (32, 48))), fps=25, **kw)
        except (av.error.FFmpegError, ValueError) as e:  # an encoder this FFmpeg build lacks
            print(f"{name}: cannot encode here ({e})")
    out["short"] = encode(d / "short.mp4", _frames(5, 99), fps=25, codec="libx264")
    assert len(out) >= 6, sorted(out)
    return out


class _Counting:
    """``av.open`` wrapped: counts opens, seeks and decoded frames."""

    def __init__(self, counts: dict, real_open, *a, **k):
        self.c, self.counts = real_open(*a, **k), counts
        counts["opens"] += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.c.close()

    @property
    def streams(self):
        return self.c.streams

    def seek(self, *a, **k):
        self.counts["seeks"] += 1
        return self.c.seek(*a, **k)

    def decode(self, *a, **k):
        for f in self.c.decode(*a, **k):
            self.counts["frames"] += 1
            yield f


@pytest.fixture
def counted(monkeypatch):
    counts = {"opens": 0, "seeks": 0, "frames": 0}
    real = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: _Counting(counts, real, *a, **k))
    return counts


def _load(path: Path, spec: ClipSpec, seed: int):
    rng = np.random.default_rng(seed)
    try:
        el = load_clip(str(path), spec, rng)
    except BadVideo as e:
        el = {"bad": str(e)}
    return el, rng.bit_generator.state


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(VIDEOS) + ["short"])
def test_index_gives_the_same_elements(videos, name, tmp_path):
    if name not in videos:
        pytest.skip(f"{name}: no encoder in this FFmpeg build")
    path = videos[name]
    cached = dataclasses.replace(SPEC, cache_dir=str(tmp_path / "idx"))
    cached.validate()
    for seed in range(12):
        plain, s_plain = _load(path, SPEC, seed)
        first, s_first = _load(path, cached, seed)  # seed 0 writes the index, the rest read it
        again, s_again = _load(path, cached, seed)
        assert _same(plain, first) and _same(plain, again), (name, seed)
        assert s_plain == s_first == s_again, (name, seed)
    entries = list((tmp_path / "idx").glob("*.npz"))
    assert len(entries) == 1
    index = video_index.IndexCache(tmp_path / "idx").load(str(path), SPEC.num_global_frames, SPEC.global_size)
    if name == "short":
        assert "bad" in plain and index.eof and index.n_known == 5 and index.global_frames is None
        return
    assert index.global_frames.shape == (4, 16, 16, 3)
    assert index.seekable  # every file here has timestamps that identify its frames: decoded by seeking
    late = [N - 9, N - 5, N - 1]
    by_seek = video_index.decode_indexed(str(path), index, late)
    from_start, _ = video_index.decode_frames(str(path), late)
    assert by_seek is not None and all(np.array_equal(by_seek[i], f) for i, f in zip(late, from_start)), name
    gop = VIDEOS[name][2]
    if gop is not None:  # the keyframes the decoder reported, as encoded
        assert np.flatnonzero(index.keyframe).tolist() == list(range(0, index.n_known, gop)), name


def test_index_decodes_only_the_clip(videos, counted, tmp_path):
    """From the index, a clip near the end of a long-GOP-8 video is decoded from the keyframe before it: one
    open, one seek, at most 8 + span frames; without the index the same element decodes the whole video."""
    path = str(videos["h264_bframes_gop8"])
    cached = dataclasses.replace(SPEC, cache_dir=str(tmp_path / "idx"))
    load_clip(path, cached, np.random.default_rng(0))  # writes the index
    index = video_index.IndexCache(tmp_path / "idx").load(path, 4, 16)
    late = next(s for s in range(200) if _clip_start(index, s) >= 24)
    start = _clip_start(index, late)
    counted.update(opens=0, seeks=0, frames=0)
    load_clip(path, SPEC, np.random.default_rng(late))
    plain_frames = counted["frames"]
    counted.update(opens=0, seeks=0, frames=0)
    load_clip(path, cached, np.random.default_rng(late))
    print(f"\nclip from frame {start} (stride <= 4, 4 frames): {plain_frames} frames decoded without the index, "
          f"{counted['frames']} with it ({counted['seeks']} seek)")
    assert plain_frames == N
    assert counted["opens"] == 1 and counted["seeks"] == 1
    assert counted["frames"] <= (start - start // 8 * 8) + 3 * 4 + 1 + 2  # + the decoder's B-frame delay


def _clip_start(index, seed: int) -> int:
    from m3ddm_jax.data.video_folder import sample_indices

    clip, _, _, _ = sample_indices(index.n_meta, index.fps, SPEC, np.random.default_rng(seed))
    return int(clip[0])


def test_damaged_or_stale_entry_is_rebuilt(videos, tmp_path):
    path = videos["h264_bframes_gop8"]
    cached = dataclasses.replace(SPEC, cache_dir=str(tmp_path / "idx"))
    want, _ = _load(path, SPEC, 3)
    _load(path, cached, 0)
    (entry,) = (tmp_path / "idx").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # a truncated entry
    got, _ = _load(path, cached, 3)
    assert _same(want, got)
    assert video_index.IndexCache(tmp_path / "idx").load(str(path), 4, 16) is not None  # rewritten
    # the video replaced by another: a new entry, the new video's frames
    other = tmp_path / "other.mp4"
    encode(other, _frames(N, 42), fps=25, codec="libx264", options={"crf": "20", "g": "8"})
    other.replace(path)
    want, _ = _load(path, SPEC, 3)
    got, _ = _load(path, cached, 3)
    assert _same(want, got) and len(list((tmp_path / "idx").glob("*.npz"))) == 2


def test_loader_with_index_matches_loader_without(videos, tmp_path):
    """Two epochs of the grain loader (with the too-short video, which it skips) give the same batches with
    and without the index; the index folder then holds one entry per video."""
    files = sorted(str(p) for p in videos.values())
    cached = dataclasses.replace(SPEC, cache_dir=str(tmp_path / "idx"))
    a = iter(make_loader(files, SPEC, batch_size=2, seed=5, num_epochs=2))
    b = iter(make_loader(files, cached, batch_size=2, seed=5, num_epochs=2))
    n = 0
    for x, y in zip(a, b):
        assert _same(x, y)
        n += 1
    assert n == len(files) * 2 // 2
    assert len(list((tmp_path / "idx").glob("*.npz"))) == len(files)


def test_unwritable_cache_dir_is_a_config_error(tmp_path):
    from m3ddm_jax.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = dataclasses.replace(SPEC, cache_dir=str(blocker / "idx"))
    with pytest.raises(ConfigError, match="data.cache_dir"):
        bad.validate()
