"""Canvas geometry: where the source frame sits, what the model generates, what is written out.

Plain Python. All sizes are (height, width) in pixels. Three frames of reference:

* source: the input video frame, ``src_h x src_w``;
* output box: the requested target shape at output size (long side ``output_size``, 256 by default as the
  reference), e.g. 256x144 for 16:9; the resized source frame sits inside it at ``frame_top/left``;
* canvas: what the model sees, every side a multiple of 64 (so every U-Net level divides evenly, spec
  section 9 items 15 and 18). ``canvas="square"`` is the reference's square canvas (``ceil64(long side)``
  on both sides); ``canvas="tight"`` rounds each side of the output box up to a multiple of 64 instead, so
  no compute goes to strips that are cropped away. The output box is centred in the canvas.

A target is either an aspect ratio ``W:H`` (the frame centred, as the reference) or per-side padding in
source pixels (left, right, top, bottom).
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

from m3ddm_jax.errors import ConfigError

MULTIPLE = 64
CANVAS_MODES = ("square", "tight")


def parse_ratio(text: str) -> Fraction:
    """``"16:9"`` -> Fraction(16, 9) (width / height). Positive integers only."""
    parts = str(text).strip().split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"ratio must be W:H with positive integers (e.g. 16:9), got {text!r}")
    a, b = int(parts[0]), int(parts[1])
    if a <= 0 or b <= 0:
        raise ConfigError(f"ratio must be W:H with positive integers (e.g. 16:9), got {text!r}")
    return Fraction(a, b)


def parse_pad(text: str) -> tuple[int, int, int, int]:
    """``"left=100,right=100"`` or ``"100,100,0,0"`` (left, right, top, bottom) -> 4 non-negative ints."""
    names = ("left", "right", "top", "bottom")
    out = dict.fromkeys(names, 0)
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        if items and all("=" in p for p in items):
            for p in items:
                k, v = (s.strip() for s in p.split("=", 1))
                if k not in out:
                    raise ConfigError(f"unknown side {k!r} in --pad (use left, right, top, bottom)")
                out[k] = int(v)
        elif len(items) == 4:
            out = dict(zip(names, (int(v) for v in items)))
        else:
            raise ValueError
    except ValueError as e:
        raise ConfigError(f"--pad must be left=N,right=N,top=N,bottom=N or four integers, got {text!r}") from e
    if any(v < 0 for v in out.values()):
        raise ConfigError(f"--pad amounts must be non-negative, got {text!r}")
    if not any(out.values()):
        raise ConfigError("--pad asks for no outpainting (all sides 0)")
    return out["left"], out["right"], out["top"], out["bottom"]


def _ceil_to(x: int, m: int) -> int:
    return max(m, -(-x // m) * m)


@dataclasses.dataclass(frozen=True)
class Geometry:
    src_h: int
    src_w: int
    frame_h: int          # resized source frame inside the output box
    frame_w: int
    out_h: int            # output box (what is written, at output size)
    out_w: int
    canvas_h: int         # model canvas (multiples of 64)
    canvas_w: int
    box_top: int          # output box inside the canvas
    box_left: int
    frame_top: int        # resized frame inside the canvas
    frame_left: int
    # target in source pixels (for full-resolution output) and the frame's offset inside it
    full_h: int
    full_w: int
    full_top: int
    full_left: int

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.canvas_h // 8, self.canvas_w // 8

    @property
    def nothing_to_outpaint(self) -> bool:
        return self.frame_h >= self.out_h and self.frame_w >= self.out_w

    @property
    def frame_in_box(self) -> tuple[int, int]:
        return self.frame_top - self.box_top, self.frame_left - self.box_left


MIN_SIDE = 8  # pixels: one latent; a thinner output has nothing to generate into


def make_geometry(src_h: int, src_w: int, *, ratio: str | Fraction | None = None,
                  pad: tuple[int, int, int, int] | None = None, output_size: int = 256,
                  canvas: str = "square") -> Geometry:
    """The geometry for one target (exactly one of ``ratio`` or ``pad``)."""
    if src_h < 1 or src_w < 1:
        raise ConfigError(f"bad frame size {src_w}x{src_h}")
    if (ratio is None) == (pad is None):
        raise ConfigError("give exactly one of a target ratio or per-side padding")
    if canvas not in CANVAS_MODES:
        raise ConfigError(f"canvas must be one of {CANVAS_MODES}, got {canvas!r}")
    if output_size < 16:
        raise ConfigError(f"output size must be at least 16 pixels, got {output_size}")

    if ratio is not None:
        r = parse_ratio(ratio) if isinstance(ratio, str) else Fraction(ratio)
        # target_max_size of the reference: extend the side that is too short for the ratio
        if Fraction(src_w, src_h) < r:
            t_h, t_w = float(src_h), float(src_h * r)
        else:
            t_h, t_w = float(src_w / r), float(src_w)
        scale = output_size / max(t_h, t_w)
        if r >= 1:
            out_w, out_h = output_size, int(output_size / r)
        else:
            out_h, out_w = output_size, int(output_size * r)
        full_h, full_w = round(t_h), round(t_w)
        full_top, full_left = (full_h - src_h) // 2, (full_w - src_w) // 2
    else:
        left, right, top, bottom = pad
        t_h, t_w = float(src_h + top + bottom), float(src_w + left + right)
        scale = output_size / max(t_h, t_w)
        out_h, out_w = max(1, round(t_h * scale)), max(1, round(t_w * scale))
        full_h, full_w, full_top, full_left = int(t_h), int(t_w), top, left

    if min(out_h, out_w) < MIN_SIDE:
        raise ConfigError(f"the target shape is too thin: a {output_size}-px output would be {out_w}x{out_h} "
                          f"pixels (each side needs at least {MIN_SIDE}); use a less extreme ratio or a larger "
                          "output size")
    frame_h = min(out_h, max(1, int(src_h * scale)))
    frame_w = min(out_w, max(1, int(src_w * scale)))
    if canvas == "square":
        side = _ceil_to(max(out_h, out_w), MULTIPLE)
        canvas_h = canvas_w = side
    else:
        canvas_h, canvas_w = _ceil_to(out_h, MULTIPLE), _ceil_to(out_w, MULTIPLE)
    box_top, box_left = (canvas_h - out_h) // 2, (canvas_w - out_w) // 2
    if ratio is not None:  # centred, as the reference pastes it
        frame_top, frame_left = (canvas_h - frame_h) // 2, (canvas_w - frame_w) // 2
    else:
        frame_top = box_top + min(out_h - frame_h, int(round(pad[2] * scale)))
        frame_left = box_left + min(out_w - frame_w, int(round(pad[0] * scale)))
    return Geometry(src_h, src_w, frame_h, frame_w, out_h, out_w, canvas_h, canvas_w, box_top, box_left,
                    frame_top, frame_left, full_h, full_w, full_top, full_left)


def describe(g: Geometry) -> str:
    return (f"source {g.src_w}x{g.src_h} -> output {g.out_w}x{g.out_h} (frame {g.frame_w}x{g.frame_h}), "
            f"canvas {g.canvas_w}x{g.canvas_h}")


def canvas_saving(g_square: Geometry, g_tight: Geometry) -> float:
    """Fraction of canvas pixels the tight canvas saves over the square one."""
    return 1.0 - (g_tight.canvas_h * g_tight.canvas_w) / (g_square.canvas_h * g_square.canvas_w)


__all__ = ["Geometry", "make_geometry", "parse_ratio", "parse_pad", "describe", "canvas_saving", "MULTIPLE", "math"]
