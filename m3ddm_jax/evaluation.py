"""The evaluation loop behind ``eval.py`` (the M3DDM+ paper's DAVIS / DAVIS Static table), as a library.

``eval.py`` parses the config (and the multi-host flags) and calls :func:`evaluate`; everything else lives here:

* :func:`parse_settings` / :func:`parse_models`: config -> :class:`~m3ddm_jax.metrics.report.Settings` and models;
* :func:`plan`: everything up to the first compute (sources, weights and their content hashes, what is left to
  score) - cheap, writes nothing;
* :class:`Evaluator`: the scorers and one :class:`~m3ddm_jax.outpaint.pipeline.Outpainter` per model; its
  :meth:`Evaluator.run` sends the videos through :func:`m3ddm_jax.outpaint.batch.run_many` (the runner batch
  ``infer.py`` uses: ``videos_per_call`` videos of one model per ``outpaint_many`` call, done rows skipped, one
  line per video that fails, the others go on) and writes one row per video atomically;
* :func:`evaluate`: one process, or one of several (``jax.distributed``): the (sequence, dataset) units are split
  over the processes (unit ``i`` to process ``i % n``), each process writes its rows to its own
  ``per_video.process<k>.jsonl`` (and ``timings.process<k>.jsonl``), and process 0, after a barrier, merges them
  into ``per_video.jsonl`` and writes the table, once every row exists. A process killed midway loses only its
  unfinished videos; a rerun (with any number of processes) scores just those.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from m3ddm_jax.errors import ConfigError, UserError
from m3ddm_jax.metrics.report import (DATASET_LABELS, Model, Settings, Store, pct, save_npy_atomic, short_hash,
                                      write_reports)
from m3ddm_jax.outpaint.batch import DEFAULT_VIDEOS_PER_CALL, Job, process_share, run_many

DIGEST_CACHE = ".digests.json"  # sha256 of the weight files, per path + size + mtime: reruns do not rehash GBs
DEFAULT_OUTPUT_ROOT = Path("runs") / "eval"  # relative to the current folder; runs/ is git-ignored in the checkout


# -- config -> settings -----------------------------------------------------------------------------------

def _split(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


def model_name(spec: str) -> str:
    from m3ddm_jax.weights import DEFAULT_UNET_REPO, M3DDM_UNET_REPO  # noqa: PLC0415

    s = spec.strip()
    if not s or s.lower() in ("m3ddm+", "m3ddm-plus") or s == DEFAULT_UNET_REPO:
        return "M3DDM+"
    if s.lower() == "m3ddm" or s == M3DDM_UNET_REPO:
        return "M3DDM"
    return Path(s.rstrip("/")).name or s


def parse_models(cfg) -> list[Model]:
    specs = [str(cfg.weights or "").strip()] + _split(cfg.compare)
    names = _split(cfg.model_names)
    if names and len(names) != len(specs):
        raise ConfigError(f"model_names has {len(names)} names for {len(specs)} weight sets")
    out, seen = [], {}
    for i, spec in enumerate(specs):
        name = names[i] if names else model_name(spec)
        if name in seen:
            seen[name] += 1
            name = f"{name} ({seen[name]})"
        else:
            seen[name] = 1
        out.append(Model(name, spec))
    return out


def parse_settings(cfg) -> Settings:
    from m3ddm_jax.masks import AXES  # noqa: PLC0415
    from m3ddm_jax.metrics.protocol import get_protocol  # noqa: PLC0415
    from m3ddm_jax.outpaint.geometry import CANVAS_MODES, parse_ratio  # noqa: PLC0415
    from m3ddm_jax.outpaint.windows import parse_strides  # noqa: PLC0415

    get_protocol(cfg.protocol)
    parse_ratio(cfg.target_ratio)
    if cfg.output_size < 64:
        raise ConfigError(f"output_size must be at least 64, got {cfg.output_size}")
    if cfg.canvas not in CANVAS_MODES:
        raise ConfigError(f"canvas must be one of {CANVAS_MODES}, got {cfg.canvas!r}")
    if cfg.steps < 1:
        raise ConfigError(f"steps must be positive, got {cfg.steps}")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.masks.axis not in AXES:
        raise ConfigError(f"masks.axis must be one of {AXES}, got {cfg.masks.axis!r}")
    try:
        ratios = tuple(float(r) for r in _split(cfg.masks.ratios))
    except ValueError as e:
        raise ConfigError(f"masks.ratios must be comma-separated numbers, got {cfg.masks.ratios!r}") from e
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ConfigError(f"masks.ratios must be numbers in (0, 1), got {cfg.masks.ratios!r}")
    datasets = tuple(_split(cfg.data.datasets))
    bad = [d for d in datasets if d not in DATASET_LABELS]
    if not datasets or bad:
        raise ConfigError(f"data.datasets must list davis and/or davis_static, got {cfg.data.datasets!r}")
    tfds = cfg.data.source == "tfds" or (cfg.data.source == "auto" and not str(cfg.data.dir or "").strip())
    m = cfg.metrics
    if m.fvd and (m.fvd_clip < 9 or m.fvd_size < 32):
        raise ConfigError("metrics.fvd_clip must be at least 9 frames and metrics.fvd_size at least 32 pixels")
    return Settings(
        protocol=cfg.protocol, target_ratio=str(cfg.target_ratio), output_size=int(cfg.output_size),
        canvas=cfg.canvas, strides=parse_strides(str(cfg.strides)) if not isinstance(cfg.strides, tuple) else tuple(cfg.strides),
        limit=None if cfg.limit is None or cfg.limit < 0 else int(cfg.limit), steps=int(cfg.steps), seed=int(cfg.seed),
        dtype=cfg.dtype, axis=cfg.masks.axis, ratios=tuple(dict.fromkeys(ratios)), datasets=tuple(dict.fromkeys(datasets)),
        source=cfg.data.tfds_name if tfds else "files", resolution="" if tfds else str(cfg.data.resolution),
        lpips=m.lpips_net if m.lpips else None, fvd=(int(m.fvd_size), int(m.fvd_clip)) if m.fvd else None,
        psnr_max=float(m.psnr_max),
    )


# -- evaluation ------------------------------------------------------------------------------------------

class Evaluator:
    def __init__(self, cfg, settings: Settings, models: list[Model], store: Store):
        from m3ddm_jax.data.davis import gt_size  # noqa: PLC0415
        from m3ddm_jax.metrics.protocol import get_protocol  # noqa: PLC0415

        self.cfg, self.s, self.models, self.store = cfg, settings, models, store
        self.protocol = get_protocol(settings.protocol)
        self.sig = settings.signature()
        self.box = gt_size(settings.target_ratio, settings.output_size)
        self._outpainters: dict[str, object] = {}
        self._model_folders: dict[str, tuple] = {}
        self._scorer = None
        self._i3d = None
        self._lpips_files = None
        self._i3d_file = None
        self.outpaint_config = settings.outpaint_config()
        self.lossless = bool(cfg.lossless_videos)
        self.save_videos = bool(cfg.save_videos) or self.lossless

    # checks that need no compute -------------------------------------------------------------------
    def check_geometry(self) -> None:
        """The outpainted box must coincide with the ground-truth box and the kept centre (not every ratio does)."""
        from m3ddm_jax.masks import eval_keep_box  # noqa: PLC0415
        from m3ddm_jax.outpaint.geometry import make_geometry  # noqa: PLC0415

        th, tw = self.box
        for r in self.s.ratios:
            top, left, h, w = eval_keep_box(th, tw, r, self.s.axis)
            g = make_geometry(h, w, ratio=self.s.target_ratio, output_size=self.s.output_size, canvas=self.s.canvas)
            if (g.out_h, g.out_w) != (th, tw) or g.frame_in_box != (top, left) or (g.frame_h, g.frame_w) != (h, w):
                raise ConfigError(
                    f"target {self.s.target_ratio} at output size {self.s.output_size}: the model's {g.out_w}x{g.out_h} output "
                    f"does not line up with the {tw}x{th} ground truth for mask ratio {r:g}; use a ratio/size whose box "
                    f"sides are multiples of 8 (e.g. 16:9 at 256, 4:3 at 64)")

    # lazily built compute ----------------------------------------------------------------------------
    def scorer(self):
        if self._scorer is None:
            from m3ddm_jax.metrics.lpips import build_lpips, lpips_flat_from_torch  # noqa: PLC0415
            from m3ddm_jax.metrics.protocol import FrameScorer  # noqa: PLC0415
            from m3ddm_jax.metrics.weights import read_arrays  # noqa: PLC0415

            lp = None
            if self._lpips_files:
                trunk, heads = self._lpips_files
                lp = build_lpips(self.s.lpips, lpips_flat_from_torch(self.s.lpips, read_arrays(trunk), read_arrays(heads)))
            self._scorer = FrameScorer(self.protocol, lp, batch=self.cfg.metrics.batch, psnr_max=self.s.psnr_max)
        return self._scorer

    def i3d(self):
        if self._i3d is None and self._i3d_file is not None:
            from m3ddm_jax.metrics.fvd import I3DFeatures, build_i3d, i3d_flat_from_released  # noqa: PLC0415
            from m3ddm_jax.metrics.weights import read_arrays  # noqa: PLC0415

            size, clip = self.s.fvd
            model = build_i3d(i3d_flat_from_released(read_arrays(self._i3d_file)))
            self._i3d = I3DFeatures(model, size=size, clip_len=clip, batch=self.cfg.metrics.fvd_batch)
        return self._i3d

    def outpainter(self, model: Model):
        if model.name not in self._outpainters:
            import jax.numpy as jnp  # noqa: PLC0415

            from m3ddm_jax.outpaint.pipeline import Outpainter  # noqa: PLC0415
            from m3ddm_jax.weights import load_models  # noqa: PLC0415

            dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[self.s.dtype]
            unet_folder, vae_folder = self._model_folders[model.name]
            unet, vae = load_models(unet_folder, vae_folder, dtype=dtype)
            self._outpainters[model.name] = Outpainter(unet, vae, self.outpaint_config)
        return self._outpainters[model.name]

    # the loop ------------------------------------------------------------------------------------------
    def pending(self, sequences: list[str]) -> list[tuple[str, str, float, Model]]:
        """What is left to score, in scoring order (sequence, dataset, ratio, model): rows missing, rows whose
        FVD features are missing, and with ``save_videos`` rows whose video is missing (scored anew: the same
        numbers, since every video is generated from the same seed)."""
        return [(seq, ds, r, m) for seq in sequences for ds in self.s.datasets for r in self.s.ratios for m in self.models
                if not self.store.has(Store.row_id(self.sig, m, ds, r, seq))
                or (self.save_videos and not self.video_path(m, ds, r, seq).is_file())]

    def video_path(self, model: Model, ds: str, r: float, seq: str) -> Path:
        name = "".join(ch if ch.isalnum() or ch in "-_.+ ()" else "_" for ch in model.name).strip() or "model"
        return (self.store.dir / "videos" / self.sig / name / f"{ds}_{r:g}"
                / f"{seq}{'.lossless' if self.lossless else ''}.mp4")

    def gt_features(self, dataset: str, seq: str, gt, n: int) -> str | None:
        if self.i3d() is None:
            return None
        name = f"gt_{short_hash(f'{self.sig}|{dataset}|{seq}|{n}')}.npy"
        path = self.store.feature_path(name)
        if not path.exists():
            save_npy_atomic(path, self.i3d()(gt[:n]))
        return name

    def run(self, source, work, label: str, *, videos_per_call: int = DEFAULT_VIDEOS_PER_CALL,
            prog: str = "eval.py") -> tuple[int, list[str]]:
        """Score ``work`` [(sequence, dataset, ratio, model)]: model by model, ``videos_per_call`` videos per
        :meth:`~m3ddm_jax.outpaint.pipeline.Outpainter.outpaint_many` call (:func:`~m3ddm_jax.outpaint.batch.run_many`).
        A video whose input fails (e.g. a corrupt file in a folder of videos) is one line on stderr and the
        others go on. Returns ``(videos scored, names of the videos that failed)``."""
        from tqdm import tqdm  # noqa: PLC0415

        inputs = _Inputs(source, self, keep=videos_per_call + 1)
        bar = tqdm(total=len(work), unit="video", desc=f"eval ({self.protocol.name})", disable=not self.cfg.progress,
                   file=sys.stderr)
        scored, failed = 0, []

        def on_outcome(o) -> None:
            nonlocal scored
            if o.status == "failed":
                failed.append(o.job.name)
                msg = o.error if o.error and o.job.name in o.error else f"{o.job.name}: {o.error}"
                tqdm.write(f"{prog}: error: {msg}", file=sys.stderr)
            elif o.status == "written":
                scored += 1
            bar.set_postfix_str(o.job.name, refresh=False)
            bar.update(1)

        for model in self.models:
            jobs = [self._job(inputs, seq, ds, r, model, label) for seq, ds, r, m in work if m == model]
            if jobs:
                run_many(self.outpainter(model), jobs, videos_per_call=videos_per_call, on_outcome=on_outcome)
        bar.close()
        return scored, failed

    def _job(self, inputs: "_Inputs", seq: str, ds: str, r: float, model: Model, label: str) -> Job:
        rid = Store.row_id(self.sig, model, ds, r, seq)
        ctx: dict = {}

        def open_():
            ctx["gt_eval"], inp, ctx["region"], ctx["fps"] = inputs.get(seq, ds, r)
            return inp, ctx["fps"]

        def finish(res):
            try:
                self._score(model, ds, r, seq, res, ctx["gt_eval"], ctx["region"], ctx["fps"])
            finally:
                ctx.clear()

        def done() -> bool:
            return self.store.has(rid) and not (self.save_videos and not self.video_path(model, ds, r, seq).is_file())

        return Job(name=f"{model.name} {label}{DATASET_LABELS[ds]} {pct(r)} {seq}", open=open_, finish=finish, done=done)

    def _score(self, model: Model, ds: str, r: float, seq: str, res, gt_eval, region, fps) -> None:
        """One scored video: metrics, FVD features, the saved video, then its row (atomically)."""
        import numpy as np  # noqa: PLC0415

        from m3ddm_jax.data.davis import jpeg_roundtrip  # noqa: PLC0415

        t1 = time.perf_counter()
        gen = jpeg_roundtrip(res.frames, self.protocol.jpeg_gen)
        n = min(len(gen), len(gt_eval))
        per_frame = self.scorer()(gt_eval[:n], gen[:n], region)
        rid = Store.row_id(self.sig, model, ds, r, seq)
        fvd_file = gt_file = None
        n_clips = None
        if self.i3d() is not None:
            gt_file = self.gt_features(ds, seq, gt_eval, n)
            feats = self.i3d()(gen[:n])
            n_clips = int(len(feats))
            fvd_file = f"gen_{short_hash(rid)}.npy"
            save_npy_atomic(self.store.feature_path(fvd_file), feats)
        row = {"id": rid, "signature": self.sig, "protocol": self.protocol.name, "model": model.name,
               "weights": model.spec, "model_id": model.identity, "dataset": ds, "mask_ratio": r,
               "axis": self.s.axis, "sequence": seq, "frames": int(n), "fps": float(fps),
               "fvd_clips": n_clips, "fvd_file": fvd_file, "gt_fvd_file": gt_file}
        row.update({k: float(np.mean(v)) for k, v in per_frame.items()})
        if self.save_videos:  # the model's output, before the protocol's JPEG of generated frames
            self.save_video(self.video_path(model, ds, r, seq), res.frames[:n], fps)
        self.store.add(row, {"seconds_generate": round(float(res.seconds), 3),
                             "seconds_score": round(time.perf_counter() - t1, 3)})

    def save_video(self, path: Path, frames, fps: float) -> None:
        from m3ddm_jax.video import write_video  # noqa: PLC0415

        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, frames, fps, lossless=self.lossless)  # atomic: a temporary name, then a rename


# -- entry point -----------------------------------------------------------------------------------------------

def output_dir(spec: str, label: str) -> Path:
    """``output_dir`` as given, or (empty) ``runs/eval/<dataset>`` under the current folder: one folder per
    dataset, so that a DAVIS run and a run on your own videos never share (or skip) rows."""
    spec = str(spec or "").strip()
    if spec:
        return Path(spec).expanduser()
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label).strip("._") or "videos"
    return DEFAULT_OUTPUT_ROOT / name


def identify(cfg, settings: Settings, models: list[Model], source, digests) -> tuple[Settings, list[Model], dict, tuple]:
    """Resolve every weights file (or fetch it, before any compute) and fold the content hashes into the
    settings (metric weights, data.fps of a DAVIS source) and the models (U-Net and VAE).

    Returns ``(settings, models, {model name: (unet folder, vae folder)}, (lpips files or None, i3d file or None))``."""
    from m3ddm_jax.metrics.fvd import resolve_i3d_file  # noqa: PLC0415
    from m3ddm_jax.metrics.lpips import resolve_lpips_files  # noqa: PLC0415
    from m3ddm_jax.metrics.report import model_identity  # noqa: PLC0415
    from m3ddm_jax.weights import resolve_weights  # noqa: PLC0415

    folders, out_models = {}, []
    for model in models:
        folders[model.name] = resolve_weights(model.spec or None, cfg.vae or None,
                                              weights_flag="--config.weights", vae_flag="--config.vae")
        unet_folder, vae_folder = folders[model.name]
        out_models.append(dataclasses.replace(model, identity=model_identity(digests.folder(unet_folder),
                                                                             digests.folder(vae_folder))))
    m = cfg.metrics
    lpips_files = i3d_file = None
    metric_weights = []
    if settings.lpips:
        lpips_files = resolve_lpips_files(settings.lpips, m.lpips_trunk or None, m.lpips_heads or None)
        metric_weights += [("lpips_trunk", digests.file(lpips_files[0])), ("lpips_heads", digests.file(lpips_files[1]))]
    if settings.fvd:
        i3d_file = resolve_i3d_file(m.fvd_weights or None)
        metric_weights.append(("i3d", digests.file(i3d_file)))
    fps = getattr(source, "fps", None)  # a DAVIS source reads at data.fps; a video folder at each file's own rate
    settings = dataclasses.replace(settings, fps=None if fps is None else float(fps), metric_weights=tuple(metric_weights))
    return settings, out_models, folders, (lpips_files, i3d_file)


@dataclasses.dataclass
class Plan:
    settings: Settings
    models: list
    source: object
    out_dir: Path
    store: Store
    evaluator: Evaluator
    sequences: list
    work: list
    digests: object

    def share(self, index: int = 0, count: int = 1) -> list:
        """What process ``index`` of ``count`` scores: the (sequence, dataset) units of every sequence are dealt
        out in order, unit ``i`` to process ``i % count`` (so a unit's ground-truth FVD features are written by
        one process), and of those units the videos still to score. The split is over all units, not over what
        is left, so processes that plan at slightly different moments agree."""
        units = [(seq, ds) for seq in self.sequences for ds in self.settings.datasets]
        mine = set(process_share(units, index, count))
        return [item for item in self.work if (item[0], item[1]) in mine]


def plan(cfg) -> Plan:
    """Everything up to the first compute: settings, sources, weights and their hashes, what is left to score."""
    from m3ddm_jax.data.davis import open_source, resolve_sequences  # noqa: PLC0415
    from m3ddm_jax.metrics.weights import DigestCache  # noqa: PLC0415

    settings = parse_settings(cfg)
    models = parse_models(cfg)
    source = open_source(cfg.data.source, cfg.data.dir, resolution=cfg.data.resolution, tfds_name=cfg.data.tfds_name,
                         tfds_splits=cfg.data.tfds_splits, fps=cfg.data.fps)
    out_dir = output_dir(cfg.output_dir, source.label)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output_dir {out_dir} is a file")
    sequences = resolve_sequences(cfg.data.sequences, source.names(), default=source.default_sequences)
    Evaluator(cfg, settings, models, None).check_geometry()  # config errors before any weights are fetched
    digests = DigestCache(out_dir / DIGEST_CACHE)
    settings, models, folders, (lpips_files, i3d_file) = identify(cfg, settings, models, source, digests)
    store = Store(out_dir)  # reads the rows of an earlier run, if any
    ev = Evaluator(cfg, settings, models, store)
    ev._model_folders, ev._lpips_files, ev._i3d_file = folders, lpips_files, i3d_file
    return Plan(settings, models, source, out_dir, store, ev, sequences, ev.pending(sequences), digests)




class _Inputs:
    """Model inputs per (sequence, dataset, mask ratio): the ground truth prepared once per sequence (the last
    ``keep`` sequences are kept: a call's videos come from a few neighbouring sequences)."""

    def __init__(self, source, ev: Evaluator, keep: int):
        self.source, self.ev, self.keep = source, ev, max(1, keep)
        self._seqs: OrderedDict = OrderedDict()

    def get(self, seq: str, ds: str, r: float):
        """``(ground truth as scored, masked model input, generated-region mask, fps)``."""
        from m3ddm_jax.data.davis import jpeg_roundtrip, masked_input, prepare_gt, static_video  # noqa: PLC0415
        from m3ddm_jax.masks import eval_pixel_mask  # noqa: PLC0415

        ev = self.ev
        if seq not in self._seqs:
            frames, fps = self.source.load(seq)
            self._seqs[seq] = {"gt": prepare_gt(frames, ev.box, ev.protocol.resize), "fps": fps}
            del frames
            while len(self._seqs) > self.keep:
                self._seqs.popitem(last=False)
        entry = self._seqs[seq]
        self._seqs.move_to_end(seq)
        if ds not in entry:
            gt = entry["gt"] if ds == "davis" else static_video(entry["gt"])
            entry[ds] = (gt, jpeg_roundtrip(gt, ev.protocol.jpeg_gt))
        gt, gt_eval = entry[ds]
        inp = jpeg_roundtrip(masked_input(gt, r, ev.s.axis), ev.protocol.jpeg_gt)
        return gt_eval, inp, eval_pixel_mask(ev.box[0], ev.box[1], r, ev.s.axis), entry["fps"]


def _prepare_output(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out_dir}: {e.strerror or e}") from e
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"output folder is not writable: {out_dir}")


def evaluate(cfg, *, videos_per_call: int = DEFAULT_VIDEOS_PER_CALL, process_index: int = 0, process_count: int = 1,
             barrier: Callable[[str], None] | None = None, prog: str = "eval.py") -> int:
    """Score what is left and write the table (see the module docstring); returns the exit code (1 when a video
    failed: its line was printed, the others are scored, the table waits for its row).

    Several processes (``process_count > 1``, ``barrier(name)`` blocking until every process reached it): each
    runs this with its own ``process_index``; process 0 prepares the folder before the others write, and writes
    the table after every process has finished its share."""
    t0 = time.perf_counter()
    p = plan(cfg)
    settings, models, out_dir, store, ev = p.settings, p.models, p.out_dir, p.store, p.evaluator
    multi = process_count > 1
    if process_index == 0:
        _prepare_output(out_dir)
        store.clean()  # a killed run's temporaries: before any process of this run writes
        p.digests.save()
    if multi:
        barrier("m3ddm_eval_start")
        if process_index:
            _prepare_output(out_dir)
        store.use_part(f"process{process_index}")
    mine = p.share(process_index, process_count)
    total = len(p.sequences) * len(settings.datasets) * len(settings.ratios) * len(models)
    who = f"process {process_index} of {process_count}: " if multi else ""
    if process_index == 0:
        print(f"{prog}: {who}protocol {settings.protocol}; {len(p.sequences)} sequences x {len(settings.datasets)} "
              f"datasets x {len(settings.ratios)} mask ratios x {len(models)} models: {total - len(p.work)} already "
              f"scored, {len(p.work)} to score{f' ({len(mine)} here)' if multi else ''} (settings signature {ev.sig})",
              file=sys.stderr)
    else:
        print(f"{prog}: {who}{len(mine)} of {len(p.work)} videos to score here", file=sys.stderr)
    done, failed = ev.run(p.source, mine, p.source.label, videos_per_call=videos_per_call, prog=prog) if mine else (0, [])
    if multi:
        barrier("m3ddm_eval_done")
        if process_index:
            print(f"{prog}: {who}scored {done} videos in {time.perf_counter() - t0:.1f} s"
                  + (f"; {len(failed)} failed" if failed else ""), file=sys.stderr)
            return 1 if failed else 0
    store.consolidate()  # every process's rows into per_video.jsonl (re-read from disk)
    missing = ev.pending(p.sequences)
    if missing:
        print(f"{prog}: error: {len(missing)} of {total} videos have no row (failures above); the table is written "
              f"once every row exists: rerun to score them", file=sys.stderr)
        return 1
    md = write_reports(store, settings, models, p.source.label, p.sequences, ev.protocol.describe(), ev.box)
    print(f"{prog}: {who}scored {done} videos in {time.perf_counter() - t0:.1f} s; table {md}", file=sys.stderr)
    return 1 if failed else 0
