"""Many videos through one :class:`~m3ddm_jax.outpaint.pipeline.Outpainter`: skip what is done, batch the rest.

The one runner behind ``infer.py`` with several inputs and behind ``eval.py`` (:mod:`m3ddm_jax.evaluation`):

* a :class:`Job` is one video with one setting: how to open it (``open() -> (frames or a lazy source, fps)``),
  whether it is already done (``done()``: an output file that exists, a row already scored), where its frames go
  (``sink()``: a context manager that yields the frame sink and commits the output atomically when left without
  an exception, e.g. a :class:`~m3ddm_jax.video.VideoWriter`), and what to do with the result (``finish``);
* :func:`run_many` skips the done jobs, orders the others by ``group`` (the canvas shape: one compile per shape),
  cuts each group into calls of at most ``videos_per_call`` videos and runs each call through
  :meth:`Outpainter.outpaint_many` (which batches the windows of same-shape videos together);
* a job that fails (an input that does not open, a file corrupt midway, a write error) is reported as one line
  (its :class:`Outcome`) and the others go on: a failure while a call runs is traced to its job when a source
  raised it, else the call is rerun one video at a time. Outputs of failed calls are discarded (nothing
  half-written ever appears under an output name);
* :func:`process_share` splits a list of work deterministically over the processes of a multi-host run
  (item ``i`` to process ``i % n``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Sequence

from m3ddm_jax.errors import UserError

DEFAULT_VIDEOS_PER_CALL = 4


@dataclasses.dataclass
class Job:
    """One video with one setting (see the module docstring)."""

    name: str                                   # for messages: an input path, a sequence
    open: Callable[[], tuple[Any, float]]       # -> (uint8 frames (N, H, W, 3) or a lazy source, fps)
    sink: Callable[[], Any] | None = None       # -> context manager yielding a frame sink (None: keep the frames)
    finish: Callable[[Any], Any] | None = None  # called with the OutpaintResult once the sink committed
    done: Callable[[], bool] | None = None      # True: skipped, nothing opened
    group: Any = None                           # same group = same canvas shape: batched together, in call order
    data: Any = None                            # the caller's (e.g. the output path)


@dataclasses.dataclass
class Outcome:
    job: Job
    status: str                  # "written", "skipped" or "failed"
    result: Any = None           # the OutpaintResult ("written")
    value: Any = None            # what ``finish`` returned
    error: str | None = None     # one line ("failed")
    seconds: float = 0.0         # wall time of the call that made it (shared by the videos of that call)
    videos_in_call: int = 0


def process_share(items: Sequence, index: int = 0, count: int = 1) -> list:
    """The items of process ``index`` of ``count``: item ``i`` goes to process ``i % count``. Deterministic for a
    deterministic ``items`` order, so every process of a multi-host run computes the same split on its own."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process {index} of {count}")
    return [x for i, x in enumerate(items) if i % count == index]


class _SourceFailed(Exception):
    """A job's source raised while being read inside a call (carries the job's index in the call)."""

    def __init__(self, index: int, error: BaseException):
        super().__init__(str(error))
        self.index, self.error = index, error


class _Tagged:
    """A lazy source whose read errors name the job they came from (everything else is the source's own)."""

    def __init__(self, source, index: int):
        self._source, self._index = source, index

    def __getattr__(self, name):
        return getattr(self._source, name)

    def __len__(self):
        return len(self._source)

    def __iter__(self):
        it = iter(self._source)
        while True:
            try:
                frame = next(it)
            except StopIteration:
                return
            except UserError as e:
                raise _SourceFailed(self._index, e) from e
            yield frame


def _lazy(frames) -> bool:
    import numpy as np  # noqa: PLC0415

    return not isinstance(frames, np.ndarray) and hasattr(frames, "num_frames")


def run_many(outpainter, jobs: Sequence[Job], *, videos_per_call: int = DEFAULT_VIDEOS_PER_CALL,
             progress: bool | Callable = False, on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run ``jobs`` through ``outpainter`` (see the module docstring); returns one :class:`Outcome` per job, in
    job order. ``on_outcome`` is called as soon as each job's outcome is known (skips first, then call by call).
    Exceptions other than :class:`~m3ddm_jax.errors.UserError` (bugs, Ctrl-C) discard the current call's
    outputs and propagate."""
    if videos_per_call < 1:
        raise UserError(f"videos per call must be at least 1, got {videos_per_call}")
    outcomes: dict[int, Outcome] = {}

    def report(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    groups: dict[Any, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.done is not None and job.done():
            report(i, Outcome(job, "skipped"))
        else:
            groups.setdefault(job.group, []).append(i)
    for members in groups.values():
        for k in range(0, len(members), videos_per_call):
            _run_call(outpainter, [(i, jobs[i]) for i in members[k:k + videos_per_call]], progress, report)
    return [outcomes[i] for i in range(len(jobs))]


def _run_call(outpainter, chunk: list[tuple[int, Job]], progress, report) -> None:
    opened = []
    for i, job in chunk:
        try:
            frames, fps = job.open()
        except UserError as e:
            report(i, Outcome(job, "failed", error=str(e)))
            continue
        opened.append((i, job, frames, fps))
    _call(outpainter, opened, progress, report)


def _call(outpainter, opened: list, progress, report) -> None:
    """One ``outpaint_many`` call over ``opened`` [(index, job, frames, fps)], isolating failures."""
    while opened:
        entered, runnable = [], []
        for i, job, frames, fps in opened:  # sinks first: a destination that cannot be written fails its job alone
            cm = sink = None
            if job.sink is not None:
                try:
                    cm = job.sink()
                    sink = cm.__enter__()
                except UserError as e:
                    report(i, Outcome(job, "failed", error=str(e)))
                    continue
            entered.append(cm)
            runnable.append((i, job, frames, fps, sink))
        if not runnable:
            return
        t0 = time.perf_counter()
        try:
            results = outpainter.outpaint_many(
                [(_Tagged(f, k) if _lazy(f) else f, fps, sink) for k, (_, _, f, fps, sink) in enumerate(runnable)],
                progress=progress)
        except BaseException as e:  # noqa: BLE001 - every open output is discarded, then: isolate or propagate
            for cm in entered:
                if cm is not None:
                    with contextlib.suppress(Exception):  # an abort that fails leaves only a dot-named temporary
                        cm.__exit__(type(e), e, e.__traceback__)
            if isinstance(e, _SourceFailed):  # a source named itself: it fails, the others run again
                i, job = runnable[e.index][:2]
                report(i, Outcome(job, "failed", error=str(e.error)))
                opened = [(i2, j2, f2, r2) for k, (i2, j2, f2, r2, _) in enumerate(runnable) if k != e.index]
                continue
            if isinstance(e, UserError):
                if len(runnable) == 1:
                    i, job = runnable[0][:2]
                    report(i, Outcome(job, "failed", error=str(e)))
                else:  # which video? one call each
                    for i2, j2, f2, r2, _ in runnable:
                        _call(outpainter, [(i2, j2, f2, r2)], progress, report)
                return
            raise
        seconds = time.perf_counter() - t0
        for (i, job, _, _, _), cm, result in zip(runnable, entered, results):
            try:
                if cm is not None:
                    cm.__exit__(None, None, None)  # commits the output (atomic rename)
                value = job.finish(result) if job.finish is not None else None
            except UserError as e:
                report(i, Outcome(job, "failed", result=result, error=str(e)))
                continue
            report(i, Outcome(job, "written", result=result, value=value,
                              seconds=time.perf_counter() - t0 if len(runnable) == 1 else seconds,
                              videos_in_call=len(runnable)))
        return
