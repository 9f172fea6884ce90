#!/usr/bin/env python
"""Reproduce the M3DDM+ paper's DAVIS / DAVIS Static table (MSE, PSNR, SSIM, LPIPS, FVD, BMSE).

    python eval.py --config configs/eval_davis.py --config.data.dir=/data/DAVIS [--config.weights=W]
                   [--config.compare=W2] [--config.protocol=clean] [--config.output_dir=DIR]
    python eval.py --config.data.dir=MY_VIDEOS          # a folder of your own videos: every video is scored
    python eval.py --config.data.dir=/data/DAVIS --print_config   # every field and its value, then exit

For every sequence x dataset (DAVIS, DAVIS Static) x mask ratio (0.25, 0.66) x model: the ground truth is
resized and centre-cropped to the target box (256x144 for 16:9), its centre is kept (192x144 / 88x144),
the model outpaints it back to the box, and the metrics of :mod:`m3ddm_jax.metrics` compare the result
with the ground truth under the chosen protocol (``reference`` = the M3DDM+ evaluation as it runs,
``clean`` = its faults fixed; see :mod:`m3ddm_jax.metrics.protocol`).

Sequences (``data.sequences``, default ``auto``): the paper's 50 DAVIS-2016 sequences for a DAVIS source
(a DAVIS folder or TFDS), every video for a folder of videos; or ``all``, a named list, or names.

Output folder (``output_dir``; default ``runs/eval/<dataset>`` under the current folder, e.g. ``runs/eval/DAVIS``
or ``runs/eval/<your video folder's name>``; ``runs/`` is git-ignored in this checkout): ``per_video.jsonl`` (one
row per video, rewritten atomically after each video), ``timings.jsonl`` (seconds per video, kept apart so that
the tables do not depend on how the run went), ``per_video.csv`` (fixed columns, table order), ``summary.md``
(the paper's layout) and ``summary.json``, ``features/`` (I3D clip embeddings, so FVD over the whole set
survives a resume), ``videos/<signature>/<model>/<dataset>_<ratio>/<sequence>.mp4`` with ``save_videos``
(``<sequence>.lossless.mp4`` with ``lossless_videos``: lossless RGB copies of the model's output that re-score
to the same numbers), ``.digests.json`` (cached content hashes of the weight files).

Resume: a rerun skips every video already scored with the same settings signature (protocol, sampler
settings, data.fps, metric weight files by content) and the same model (U-Net and VAE files by content), and
scores anew whatever changed. A run killed at any moment, rerun, writes the same tables as an uninterrupted
run. Bad input gives one line on stderr and exit code 1.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from m3ddm_jax.cli_common import (CONFIG_ERRORS, absl_flags_parser, checked_config, config_error_message,  # noqa: E402
                                  print_config)
from m3ddm_jax.errors import ConfigError, UserError  # noqa: E402
from m3ddm_jax.runtime import tune_malloc  # noqa: E402

tune_malloc()  # m3ddm_jax/runtime.py
from m3ddm_jax.metrics.report import (DATASET_LABELS, Model, Settings, Store, short_hash, pct,  # noqa: E402
                                      save_npy_atomic, write_reports)

PROG = "eval.py"
DIGEST_CACHE = ".digests.json"  # sha256 of the weight files, per path + size + mtime: reruns do not rehash GBs
DEFAULT_OUTPUT_ROOT = Path("runs") / "eval"  # relative to the current folder; runs/ is git-ignored in the checkout
REPO = Path(__file__).resolve().parent
_CONFIG = None  # the --config flag, defined when run as a script (so importing this file defines no flags)
_PRINT_CONFIG = None


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

    def run(self, source, work, label: str) -> int:
        import numpy as np  # noqa: PLC0415
        from tqdm import tqdm  # noqa: PLC0415

        from m3ddm_jax.data.davis import jpeg_roundtrip, masked_input, prepare_gt, static_video  # noqa: PLC0415
        from m3ddm_jax.masks import eval_pixel_mask  # noqa: PLC0415

        by_seq: dict[str, list] = {}
        for item in work:
            by_seq.setdefault(item[0], []).append(item)
        bar = tqdm(total=len(work), unit="video", desc=f"eval ({self.protocol.name})", disable=not self.cfg.progress,
                   file=sys.stderr)
        done = 0
        for seq, items in by_seq.items():
            frames, fps = source.load(seq)
            gt_moving = prepare_gt(frames, self.box, self.protocol.resize)
            del frames
            for ds in self.s.datasets:
                ds_items = [it for it in items if it[1] == ds]
                if not ds_items:
                    continue
                gt = gt_moving if ds == "davis" else static_video(gt_moving)
                gt_eval = jpeg_roundtrip(gt, self.protocol.jpeg_gt)
                for r in self.s.ratios:
                    r_items = [it for it in ds_items if it[2] == r]
                    if not r_items:
                        continue
                    inp = jpeg_roundtrip(masked_input(gt, r, self.s.axis), self.protocol.jpeg_gt)
                    region = eval_pixel_mask(self.box[0], self.box[1], r, self.s.axis)
                    for _, _, _, model in r_items:
                        bar.set_postfix_str(f"{model.name} {label}{DATASET_LABELS[ds]} {pct(r)} {seq}", refresh=False)
                        t0 = time.perf_counter()
                        res = self.outpainter(model)(inp, fps)
                        gen = jpeg_roundtrip(res.frames, self.protocol.jpeg_gen)
                        t1 = time.perf_counter()
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
                        self.store.add(row, {"seconds_generate": round(t1 - t0, 3),
                                             "seconds_score": round(time.perf_counter() - t1, 3)})
                        done += 1
                        bar.update(1)
        bar.close()
        return done

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


def evaluate(cfg) -> int:
    t0 = time.perf_counter()
    p = plan(cfg)
    settings, models, out_dir, store, ev, work = p.settings, p.models, p.out_dir, p.store, p.evaluator, p.work
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out_dir}: {e.strerror or e}") from e
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"output folder is not writable: {out_dir}")
    store.clean()
    p.digests.save()
    total = len(p.sequences) * len(settings.datasets) * len(settings.ratios) * len(models)
    print(f"{PROG}: protocol {settings.protocol}; {len(p.sequences)} sequences x {len(settings.datasets)} datasets x "
          f"{len(settings.ratios)} mask ratios x {len(models)} models: {total - len(work)} already scored, "
          f"{len(work)} to score (settings signature {ev.sig})", file=sys.stderr)
    done = ev.run(p.source, work, p.source.label) if work else 0
    md = write_reports(store, settings, models, p.source.label, p.sequences, ev.protocol.describe(), ev.box)
    print(f"{PROG}: scored {done} videos in {time.perf_counter() - t0:.1f} s; table {md}", file=sys.stderr)
    return 0


def main(argv) -> None:
    from absl import logging  # noqa: PLC0415

    logging.set_verbosity(logging.WARNING)  # no INFO chatter from JAX's backend probing
    if len(argv) > 1:
        print(f"{PROG}: error: unexpected arguments {' '.join(argv[1:])} (options are --config.FIELD=VALUE)", file=sys.stderr)
        sys.exit(1)
    try:
        cfg = checked_config(_CONFIG.value)  # a config file that failed to load reports here
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    if _PRINT_CONFIG.value:
        from absl import flags  # noqa: PLC0415

        print_config(cfg, flags.FLAGS["config"].config_filename)
        sys.exit(0)
    try:
        code = evaluate(cfg)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (finished videos are kept; rerun to resume)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def define_flags() -> None:
    global _CONFIG, _PRINT_CONFIG
    from absl import flags  # noqa: PLC0415

    _PRINT_CONFIG = flags.DEFINE_bool("print_config", False,
                                      "print the config's fields and values (after --config.* overrides) and exit")
    try:  # config_flags reads the file and applies --config.* overrides right here
        _CONFIG = config_flags.DEFINE_config_file("config", str(REPO / "configs" / "eval_davis.py"),
                                                  "evaluation config file (ml_collections)", lock_config=True)
    except CONFIG_ERRORS as e:
        print(f"{PROG}: error: {config_error_message(e, sys.argv)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=absl_flags_parser(PROG))
