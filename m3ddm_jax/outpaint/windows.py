"""The coarse-to-fine window schedule over a whole video (plain Python, no JAX).

M3DDM samples a video in 16-frame windows at several temporal strides, coarse first (spec section 5.4).
For stride ``s`` the strided frame list is ``[0, s, 2s, ...]``; windows start at offsets 0, 15, 30, ... of
that list (consecutive windows share one frame), and are right-padded to 16 slots with the last frame
``N - 1``. A frame that already has a latent from an earlier window is *known* in later windows (its
latent is injected as a guide frame). The reference runs only stride 1 for videos shorter than 50 frames.

Differences from the reference, on purpose (spec section 9 items 13-14):

* every frame 0..N-1 is produced: there is no 16-per-window counter that can stop the last stride-1
  window early, a 1-frame video gets a window, and stride 1 always ends the schedule;
* each output frame is emitted exactly once, from the last stride-1 window that holds it as a real
  (non-padding) slot, which is the decode the reference's file overwrites end with; padding slots are
  never written.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from m3ddm_jax.errors import ConfigError

WINDOW = 16        # frames per window
STEP = 15          # window start step (one frame of overlap)
COARSE_MIN_FRAMES = 50  # below this many frames only stride 1 runs (as the reference)


@dataclasses.dataclass(frozen=True)
class Window:
    stride: int
    start: int                      # offset into the strided frame list
    frames: tuple[int, ...]         # source frame index of each slot (padded with N - 1)
    n_real: int                     # slots [0, n_real) are real strided frames, the rest padding
    known: tuple[bool, ...]         # slot already has a latent from an earlier window
    fps_cond: float                 # fps // stride (the U-Net truncates it to an integer)
    emit: tuple[bool, ...] = ()     # slot's decoded image is the final output of its frame

    @property
    def generated(self) -> tuple[bool, ...]:
        return tuple(not k for k in self.known)


def parse_strides(strides: Sequence[int] | str) -> tuple[int, ...]:
    if isinstance(strides, str):
        try:
            strides = [int(s) for s in strides.replace(" ", "").split(",") if s]
        except ValueError as e:
            raise ConfigError(f"strides must be comma-separated positive integers, got {strides!r}") from e
    strides = tuple(int(s) for s in strides)
    if not strides or any(s < 1 for s in strides):
        raise ConfigError(f"strides must be positive integers, got {list(strides)}")
    # coarse to fine, each once, always ending with stride 1
    return tuple(sorted(set(strides) | {1}, reverse=True))


def strides_for(num_frames: int, strides: Sequence[int] | str = (15, 5, 1), limit: int | None = None,
                coarse_min_frames: int = COARSE_MIN_FRAMES) -> tuple[int, ...]:
    """The strides the reference uses: stride 1 alone for short videos or when a frame limit cuts the video."""
    strides = parse_strides(strides)
    if num_frames < coarse_min_frames or (limit is not None and limit < num_frames):
        return (1,)
    return strides


def global_frame_indices(num_frames: int, count: int = 16) -> np.ndarray:
    """``int(linspace(0, N - 1, count))``: the frames whose latents feed the global encoder."""
    return np.linspace(0, num_frames - 1, count).astype(np.int64)


def plan_windows(num_frames: int, strides: Sequence[int] | str = (15, 5, 1), fps: float = 30.0,
                 limit: int | None = None, coarse_min_frames: int = COARSE_MIN_FRAMES) -> list[Window]:
    """All windows of a video of ``num_frames`` frames, in execution order.

    ``limit`` (the reference's ``limit_outpainting_frames``) outpaints only frames ``0..limit-1``; the
    windows then run over those frames alone (stride 1).
    """
    if num_frames < 1:
        raise ConfigError("the video has no frames")
    used = strides_for(num_frames, strides, limit, coarse_min_frames)
    n = num_frames if limit is None or limit <= 0 else min(limit, num_frames)
    last = n - 1
    has_latent = [False] * n
    windows: list[Window] = []
    for s in used:
        strided = list(range(0, n, s))
        for start in range(0, max(n // s - 1, 1), STEP):
            real = strided[start:start + WINDOW]
            if not real:
                continue
            frames = tuple(real + [last] * (WINDOW - len(real)))
            known = tuple(has_latent[f] for f in frames)
            windows.append(Window(s, start, frames, len(real), known, float(fps // s)))
            for f in frames:
                has_latent[f] = True
    # emit: each frame from the last stride-1 window that holds it as a real slot
    owner: dict[int, tuple[int, int]] = {}
    for wi, w in enumerate(windows):
        if w.stride != 1:
            continue
        for j in range(w.n_real):
            owner[w.frames[j]] = (wi, j)
    if sorted(owner) != list(range(n)):  # cannot happen: stride 1 covers every frame
        raise AssertionError("window schedule does not cover every frame")
    out = []
    for wi, w in enumerate(windows):
        emit = tuple(owner.get(w.frames[j]) == (wi, j) if j < w.n_real else False for j in range(WINDOW))
        out.append(dataclasses.replace(w, emit=emit))
    return out


def window_waves(windows: Sequence[Window]) -> list[list[int]]:
    """Group a plan's windows (indices, execution order) into waves that can run at once.

    Window ``j`` depends on an earlier window ``i`` when ``j`` reads as known a latent that ``i`` wrote first,
    or when both would write the same frame first (``i`` then wins, as in the sequential order). Waves are
    the longest-path levels of that graph, so every dependency of a wave lies in an earlier wave and the
    windows of one wave neither read nor write each other's frames: running a wave at once gives the
    sequential result. For strides (15, 5, 1) or (5, 3, 1) a video of 69 frames has 3 waves (7 windows);
    strides that create dependencies inside a level, e.g. (4, 3, 1), simply give more waves."""
    writer: dict[int, int] = {}
    level: list[int] = []
    for j, w in enumerate(windows):
        deps = set()
        for f, known in zip(w.frames, w.known):
            if known:
                if f not in writer:
                    raise ValueError(f"window {j} reads frame {f} as known, but no earlier window writes it")
                deps.add(writer[f])
            elif f in writer:  # both would write it first: keep the plan's order
                deps.add(writer[f])
        for f in w.frames:
            writer.setdefault(f, j)
        level.append(1 + max(level[i] for i in deps) if deps else 0)
    waves: list[list[int]] = [[] for _ in range(max(level, default=-1) + 1)]
    for j, lv in enumerate(level):
        waves[lv].append(j)
    return waves
