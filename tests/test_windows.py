"""The coarse-to-fine window schedule against the reference's recorded windows."""
from __future__ import annotations

import json

import numpy as np
import pytest

from m3ddm_jax.errors import ConfigError
from m3ddm_jax.outpaint.windows import global_frame_indices, parse_strides, plan_windows, strides_for


@pytest.fixture(scope="module")
def schedule(fixtures_dir):
    return json.loads((fixtures_dir / "coarse_to_fine_schedule.json").read_text())


def test_matches_reference_windows(schedule):
    assert len(schedule["runs"]) == 8
    for run in schedule["runs"]:
        n, req = run["total_frames"], run["strides_requested"]
        assert list(strides_for(n, req)) == run["strides_used"]
        np.testing.assert_array_equal(global_frame_indices(n, run["num_global_frames"]), run["global_frame_indices"])
        ours = plan_windows(n, req, fps=run["fps"])
        ref = run["windows"]
        assert len(ours) == len(ref), (n, req)
        for w, r in zip(ours, ref):
            assert w.stride == r["stride"] and w.start == r["start_frame"]
            assert list(w.frames) == r["frame_indices"]
            assert w.n_real == r["n_real_frames"] and 16 - w.n_real == r["n_padded"]
            assert list(w.known) == r["known"] and list(w.generated) == r["generated"]
            assert w.fps_cond == r["fps_arg"]
        print(f"\n{n} frames {req}: {len(ours)} windows equal to the reference")


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 31, 49, 50, 69, 100, 120, 199, 200, 201, 333])
@pytest.mark.parametrize("strides", [(15, 5, 1), (5, 3, 1), (7,)])
def test_every_frame_emitted_exactly_once(n, strides):
    windows = plan_windows(n, strides)
    emitted = [w.frames[j] for w in windows for j in range(16) if w.emit[j]]
    assert sorted(emitted) == list(range(n))
    for w in windows:
        assert len(w.frames) == 16 and all(0 <= f < n for f in w.frames)
        assert not any(w.emit[j] for j in range(w.n_real, 16))
    assert windows[-1].stride == 1


def test_tail_is_not_skipped():
    # The reference's 16-per-window counter stops before the last window for N=200 (frames 196-199 lost).
    windows = plan_windows(200, (15, 5, 1))
    fine = [w for w in windows if w.stride == 1]
    assert fine[-1].start == 195 and fine[-1].frames[:5] == (195, 196, 197, 198, 199)


def test_frame_limit_and_bad_strides():
    w = plan_windows(69, (15, 5, 1), limit=16)
    assert len(w) == 1 and w[0].frames == tuple(range(16)) and w[0].stride == 1
    assert parse_strides("15,5") == (15, 5, 1)
    for bad in ("a,b", "0,1", ""):
        with pytest.raises(ConfigError):
            parse_strides(bad)
    with pytest.raises(ConfigError):
        plan_windows(0)


def test_too_thin_a_target_is_refused():
    """100:1 at 64 px would be a 64x0 output: one ConfigError naming the sizes, not an empty video."""
    from m3ddm_jax.errors import ConfigError
    from m3ddm_jax.outpaint.geometry import MIN_SIDE, make_geometry

    with pytest.raises(ConfigError, match="too thin: a 64-px output would be 64x0"):
        make_geometry(640, 360, ratio="100:1", output_size=64)
    with pytest.raises(ConfigError, match="too thin"):
        make_geometry(360, 640, pad=(0, 0, 5000, 5000), output_size=64)
    g = make_geometry(640, 360, ratio="8:1", output_size=64)
    assert (g.out_w, g.out_h) == (64, MIN_SIDE)
