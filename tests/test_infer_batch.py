"""infer.py on many videos (issue 9, item 4): a folder, a glob, several files; outputs named
``<stem>_<W>-<H>.mp4`` in ``--output-dir``; existing outputs skipped unless ``--overwrite`` (each named on a
line); a corrupt input among them is one error line, the others are written, exit code 1; same-shape videos
share one compile and go through ``Outpainter.outpaint_many`` together; a video written in a batch equals the
same video written alone.

infer.py runs in-process (the tiny models, 2 steps, 64-px output): models are loaded once and every run shares
one Outpainter per setting, so the whole file compiles the sampler once."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from m3ddm_jax.video import read_video, write_video
from tests.media import infer_in_process

COMMON = ("--ratio", "16:9", "--output-size", "64", "--steps", "2", "--quiet")


def clip_frames(n: int, seed: int) -> np.ndarray:
    """``n`` frames of 48x27 (9:16), moving gradients: different per seed."""
    yy, xx = np.mgrid[0:48, 0:27]
    out = np.empty((n, 48, 27, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx * 9 + 5 * i + 70 * seed) % 256
        out[i, ..., 1] = (yy * 5 + 3 * i) % 256
        out[i, ..., 2] = (100 + 50 * np.sin((xx + yy + 2 * i + seed) / 5.0)).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def infer(weights_dir):
    """``run(*args) -> (rc, stdout, stderr)`` of infer.py's main in this process; ``run.loads`` counts model loads,
    ``run.calls`` records the ``outpaint_many`` calls (videos per call), ``run.outpainters`` the shared Outpainters."""
    calls = []

    def record_calls(op):
        real_many = op.outpaint_many

        def outpaint_many(jobs, *aa, **kk):
            jobs = list(jobs)
            calls.append(len(jobs))
            return real_many(jobs, *aa, **kk)

        op.outpaint_many = outpaint_many
        return op

    with infer_in_process("infer_batch_under_test", record_calls) as run:
        run.calls = calls
        yield run


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A folder of two short clips (5 and 7 frames; one canvas shape), lossless."""
    d = tmp_path_factory.mktemp("clips")
    write_video(d / "a.mp4", clip_frames(5, 0), 24, lossless=True)
    write_video(d / "b.mp4", clip_frames(7, 1), 24, lossless=True)
    return d


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_folder_then_rerun_skips_then_overwrite(infer, clips, weights_dir, tmp_path):
    """Lossless outputs, so "the same frames" after --overwrite is exact. The lossy yuv420p x264 bitstream of this
    64x36 video is not reproducible within one process: the frames handed to the encoder are identical, yet the
    PyAV/libx264 output changes with the heap's history (the same frames encoded after unrelated malloc/free
    traffic give 2-3 different bitstreams in 8 tries). A lossless output decodes to exactly the frames handed in."""
    out = tmp_path / "out"  # created by infer.py
    args = (clips, "--output-dir", out, "--lossless", "--weights", weights_dir, *COMMON)
    loads, n_calls = infer.loads, len(infer.calls)
    rc, so, se = infer(*args)
    print(so, se)
    assert rc == 0, se
    assert sorted(p.name for p in out.iterdir()) == ["a_16-9.mp4", "b_16-9.mp4"]  # no temporaries either
    for name, n in (("a_16-9.mp4", 5), ("b_16-9.mp4", 7)):
        v = read_video(out / name)
        assert v.num_frames == n and v.frames.shape[1:3] == (36, 64)
        assert f"{out / name}: {n} frames" in so  # each written output is named with its summary
    assert "2 written, 0 skipped (exist), 0 failed" in so
    assert infer.calls[n_calls:] == [2]  # both videos (one canvas shape) in one outpaint_many call
    assert infer.loads == loads + 1
    before = stamps(out)

    # rerun: both skipped, named, nothing rewritten, no weights loaded
    rc, so, se = infer(*args)
    assert rc == 0, se
    assert f"skipped {out / 'a_16-9.mp4'}: exists" in so and f"skipped {out / 'b_16-9.mp4'}: exists" in so
    assert "0 written, 2 skipped (exist), 0 failed" in so
    assert stamps(out) == before and infer.loads == loads + 1 and len(infer.calls) == n_calls + 1

    # --overwrite: written again, the same frames (same seed)
    frames = {p.name: read_video(p).frames for p in out.iterdir()}
    rc, so, se = infer(*args, "--overwrite")
    assert rc == 0, se
    assert "2 written, 0 skipped (exist), 0 failed" in so
    after = stamps(out)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    for name, f in frames.items():
        np.testing.assert_array_equal(read_video(out / name).frames, f)


def test_batch_output_equals_single_input_output(infer, clips, weights_dir, tmp_path):
    """b.mp4 outpainted alone (``infer.py IN -o OUT``, today's single-input path) and in a call with a.mp4 (a glob
    this time): the frames agree."""
    rc, so, se = infer(str(clips / "*.mp4"), "--output-dir", tmp_path / "glob", "--lossless", "--weights", weights_dir,
                       *COMMON)
    assert rc == 0, se
    assert sorted(p.name for p in (tmp_path / "glob").iterdir()) == ["a_16-9.mp4", "b_16-9.mp4"]
    rc, so, se = infer(clips / "b.mp4", "-o", tmp_path / "alone.mp4", "--lossless", "--weights", weights_dir, *COMMON)
    assert rc == 0, se
    assert so.startswith(f"{tmp_path / 'alone.mp4'}: 7 frames") and "written" not in so  # single-input output as before
    batched = read_video(tmp_path / "glob" / "b_16-9.mp4").frames.astype(int)
    alone = read_video(tmp_path / "alone.mp4").frames.astype(int)
    diff = int(np.abs(batched - alone).max())
    print(f"\nb.mp4 batched with a.mp4 vs alone: max abs difference {diff} (uint8 levels, lossless outputs)")
    assert batched.shape == alone.shape and diff <= 1  # float rounding of a batched call, after uint8 quantisation


def test_corrupt_input_among_others(infer, clips, weights_dir, tmp_path):
    """A corrupt file, a missing file and an empty glob among two good inputs: one error line each, the good
    ones written, exit code 1, nothing half-written."""
    (tmp_path / "bad.mp4").write_text("not a video\n")
    out = tmp_path / "out"
    rc, so, se = infer(clips / "a.mp4", tmp_path / "bad.mp4", clips / "b.mp4", tmp_path / "missing.mp4",
                       str(tmp_path / "none*.mov"), "--output-dir", out, "--weights", weights_dir, *COMMON)
    print(so, se)
    assert rc == 1
    errors = [ln for ln in se.splitlines() if ln.strip()]
    assert len(errors) == 3 and all(ln.startswith("infer.py: error: ") for ln in errors), se
    assert sum("bad.mp4" in ln for ln in errors) == 1 and sum("missing.mp4" in ln for ln in errors) == 1
    assert sum("none*.mov" in ln for ln in errors) == 1 and "Traceback" not in se
    assert sorted(p.name for p in out.iterdir()) == ["a_16-9.mp4", "b_16-9.mp4"]
    assert "2 written, 0 skipped (exist), 3 failed" in so
    assert (tmp_path / "bad.mp4").read_text() == "not a video\n"  # the input is never touched


def test_one_compile_for_every_run_of_this_file(infer):
    """Every run above had one setting and one canvas shape: the sampler compiled once."""
    assert infer.outpainters, "run the other tests of this file first"
    for op in infer.outpainters.values():
        assert op.denoiser.trace_count == 1


def test_batch_argument_errors(infer, clips, weights_dir, tmp_path):
    rc, so, se = infer(clips, "-o", tmp_path / "x.mp4", "--weights", weights_dir, *COMMON)
    assert rc == 1 and se.count("\n") == 1 and "--output-dir" in se
    rc, so, se = infer(clips / "a.mp4", "--overwrite", "-o", tmp_path / "x.mp4", "--weights", weights_dir, *COMMON)
    assert rc == 1 and se.count("\n") == 1 and "--overwrite" in se
    assert not (tmp_path / "x.mp4").exists()


# -- the runner itself (no model: a stand-in Outpainter that reads every source and feeds every sink) -------------

class FakeOutpainter:
    """``outpaint_many`` as the contract says: reads each source whole, sends its frames to its sink, returns one
    result per job in order. ``fail_on``: a frame count that raises a UserError not tied to a source."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def outpaint_many(self, jobs, progress=False):
        from m3ddm_jax.errors import UserError

        self.calls.append(len(jobs))
        results = []
        for frames, fps, sink in jobs:
            got = list(frames)
            if len(got) == self.fail_on:
                raise UserError(f"cannot outpaint {len(got)} frames")
            for f in got:
                if sink is not None:
                    sink(f)
            results.append(len(got))
        return results


class Source:
    def __init__(self, n, fail_at=None, name="src"):
        self.num_frames, self.height, self.width, self.fail_at, self.name = n, 2, 2, fail_at, name

    def __iter__(self):
        from m3ddm_jax.errors import UserError

        for i in range(self.num_frames):
            if i == self.fail_at:
                raise UserError(f"{self.name}: corrupt at frame {i}")
            yield np.zeros((2, 2, 3), np.uint8)


def test_run_many_isolates_failures_and_discards_their_outputs():
    from m3ddm_jax.errors import UserError
    from m3ddm_jax.outpaint.batch import Job, process_share, run_many

    committed, aborted = [], []

    def sink_for(name):
        @contextlib.contextmanager
        def sink():
            got = []
            try:
                yield got.append
            except BaseException:
                aborted.append(name)
                raise
            committed.append((name, len(got)))
        return sink

    def job(name, n, fail_at=None, done=False, group=None):
        return Job(name=name, open=lambda: (Source(n, fail_at, name), 24.0), sink=sink_for(name),
                   finish=lambda r: r * 10, done=lambda: done, group=group)

    # a source failing midway inside a call of three: it alone fails, the two others are run again and written
    op = FakeOutpainter()
    jobs = [job("a", 3), job("b", 4, fail_at=2), job("c", 5), job("d", 6, done=True)]
    out = run_many(op, jobs, videos_per_call=3)
    assert [o.status for o in out] == ["written", "failed", "written", "skipped"]
    assert out[1].error == "b: corrupt at frame 2" and [o.value for o in out] == [30, None, 50, None]
    assert op.calls == [3, 2] and sorted(committed) == [("a", 3), ("c", 5)] and sorted(aborted) == ["a", "b", "c"]

    # an error no source claims: the call is rerun one video at a time to find it
    committed.clear(), aborted.clear()
    op = FakeOutpainter(fail_on=4)
    out = run_many(op, [job("a", 3), job("b", 4), job("c", 5)], videos_per_call=4)
    assert [o.status for o in out] == ["written", "failed", "written"] and op.calls == [3, 1, 1, 1]
    assert sorted(committed) == [("a", 3), ("c", 5)]

    # an input that does not open fails alone; groups are never mixed in a call; order of outcomes = job order
    def unreadable():
        raise UserError("x: not a video")

    bad = Job(name="x", open=unreadable)
    op = FakeOutpainter()
    out = run_many(op, [job("a", 1, group=1), bad, job("b", 1, group=2), job("c", 1, group=1)], videos_per_call=8)
    assert [o.status for o in out] == ["written", "failed", "written", "written"] and op.calls == [2, 1]

    assert process_share(list(range(7)), 0, 3) == [0, 3, 6] and process_share(list(range(7)), 2, 3) == [2, 5]
    assert sorted(sum((process_share(list(range(7)), i, 3) for i in range(3)), [])) == list(range(7))
