"""The training loop: models, mesh, sharded state, jitted step, data, checkpoints, logs, validation, export.

    trainer = Trainer(config, workdir)   # builds everything, resumes from WORKDIR/checkpoints if present
    history = trainer.run()              # trains to config.train.steps (or a SIGTERM / stop_at), saves, exports
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax import masks as M
from m3ddm_jax.errors import ConfigError, UserError
from m3ddm_jax.train import sharding as S
from m3ddm_jax.train.checkpoint import Checkpointer, abstract_like
from m3ddm_jax.train.step import StepConfig, StepFns, init_state, make_optimizer, state_shardings
from m3ddm_jax.train.writer import MetricWriter

log = logging.getLogger("m3ddm_jax.train")

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def _dtype(name: str):
    if name in (None, "", "none"):
        return None
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r} (float32, bfloat16, float16)") from None


# -- config values --------------------------------------------------------------------------------------

# (field, kind, lower bound or None, description of the bound): checked before anything is built, so a bad
# value is one line naming the field instead of a traceback (or a ZeroDivisionError) after minutes of compiling
_CHECKS = (
    ("seed", int, None, ""),
    ("train.steps", int, 1, ">= 1"), ("train.batch_size", int, 1, ">= 1"), ("train.grad_accum", int, 1, ">= 1"),
    ("checkpoint.every", int, 1, ">= 1"), ("checkpoint.keep", int, 1, ">= 1"), ("log.every", int, 1, ">= 1"),
    ("val.every", int, 0, ">= 0 (0 = never)"), ("val.batches", int, 1, ">= 1"), ("val.batch_size", int, 0, ">= 0"),
    ("preview.every", int, 0, ">= 0 (0 = off)"), ("preview.frames", int, 1, ">= 1"), ("preview.steps", int, 2, ">= 2"),
    ("preview.output_size", int, 8, ">= 8"), ("data.worker_count", int, 0, ">= 0"),
    ("data.worker_buffer_size", int, 1, ">= 1"), ("data.max_retries", int, 0, ">= 0"),
    ("data.num_frames", int, 1, ">= 1"), ("data.num_global_frames", int, 1, ">= 1"), ("data.size", int, 8, ">= 8"),
    ("data.global_size", int, 8, ">= 8"), ("data.max_stride", int, 1, ">= 1"), ("data.min_frames", int, 1, ">= 1"),
    ("sharding.min_shard_elements", int, 0, ">= 0"),
    ("optim.lr", float, None, ""), ("optim.b1", float, 0.0, "in [0, 1)"), ("optim.b2", float, 0.0, "in [0, 1)"),
    ("optim.eps", float, 0.0, ">= 0"), ("optim.weight_decay", float, 0.0, ">= 0"),
    ("optim.clip_norm", float, 0.0, ">= 0 (0 = off)"), ("optim.warmup_steps", int, 0, ">= 0"),
    ("optim.ema_decay", float, 0.0, "in [0, 1)"), ("model.attention_budget_mib", float, None, ""),
    ("mask.p_frame", float, 0.0, "in [0, 1]"), ("mask.drop_local", float, 0.0, "in [0, 1]"),
    ("mask.drop_global", float, 0.0, "in [0, 1]"), ("preview.crop_ratio", float, 0.0, "in [0, 1)"),
)
_UPPER = {"optim.b1": (1.0, False), "optim.b2": (1.0, False), "optim.ema_decay": (1.0, False),
          "mask.p_frame": (1.0, True), "mask.drop_local": (1.0, True), "mask.drop_global": (1.0, True),
          "preview.crop_ratio": (1.0, False)}
_NUMBER_TUPLES = (("mask.probs", None), ("mask.width_range", 2), ("mask.frame_case_probs", 3), ("data.crop_scale", 2),
                  ("data.crop_ratio", 2))
_CHOICES = (("optim.name", ("adam", "adamw")), ("model.attention_impl", ("xla", "dot_product", "cudnn")),
            ("export.format", ("safetensors", "bin")), ("model.compute_dtype", tuple(_DTYPES) + ("none", "")),
            ("model.vae_compute_dtype", tuple(_DTYPES) + ("none", "")), ("export.dtype", tuple(_DTYPES) + ("none", "")))


def _field(config, dotted: str):
    node = config
    for k in dotted.split("."):
        node = node[k]
    return node


def check_config(config) -> None:
    """A :class:`ConfigError` (one line naming the field, the value and what it takes) for a value of the
    wrong type or out of range. Field-specific rules (mask probabilities, mesh shape, ...) stay where the field
    is used; this covers the counters, rates and enumerations every run reads."""
    for dotted, kind, lo, what in _CHECKS:
        value = _field(config, dotted)
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok_type = ok_type and float(value).is_integer()
        if not ok_type or not math.isfinite(float(value)):
            raise ConfigError(f"{dotted} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        hi, hi_incl = _UPPER.get(dotted, (None, True))
        if (lo is not None and value < lo) or (hi is not None and (value > hi or (value == hi and not hi_incl))):
            raise ConfigError(f"{dotted} must be {what}, got {value!r}")
    for dotted, n in _NUMBER_TUPLES:
        value = _field(config, dotted)
        items = tuple(value) if isinstance(value, (tuple, list)) else None
        if items is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items) or (
                n is not None and len(items) != n):
            size = f"{n} numbers" if n else "numbers"
            raise ConfigError(f"{dotted} must be a tuple of {size}, e.g. {dotted}='(0.3,0.55,0.15)', got {value!r}"
                              if dotted == "mask.probs" else f"{dotted} must be a tuple of {size}, got {value!r}")
    for dotted, choices in _CHOICES:
        value = _field(config, dotted)
        key = str(value).lower() if isinstance(value, str) or value is None else value
        if key not in choices and not (value is None and "none" in choices):
            shown = [c for c in choices if c not in ("none", "")]
            raise ConfigError(f"{dotted} must be one of {', '.join(shown)}, got {value!r}")


# -- config -> parts --------------------------------------------------------------------------------------

def step_config(config) -> StepConfig:
    m = config.mask
    probs = tuple(m.probs)
    preset = str(m.get("preset", "") or "")
    if preset:
        if m.mode != "uniform":
            raise ConfigError("mask.preset applies to the uniform masks; set mask.preset='' for per_frame")
        if preset not in M.UNIFORM_PRESETS:
            raise ConfigError(f"mask.preset must be one of {sorted(M.UNIFORM_PRESETS)} or '', got {preset!r}")
        probs = M.UNIFORM_PRESETS[preset]
    return StepConfig(
        mask_mode=m.mode, mask_probs=probs, width_range=tuple(m.width_range),
        frame_case_probs=tuple(m.frame_case_probs), p_frame=float(m.p_frame), drop_local=float(m.drop_local),
        drop_global=float(m.drop_global), mask_global=bool(m.mask_global), loss=config.train.loss,
        batchnorm=config.model.batchnorm, grad_accum=int(config.train.grad_accum),
        ema_decay=float(config.optim.ema_decay))


def optimizer(config):
    o = config.optim
    return make_optimizer(o.name, float(o.lr), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                          weight_decay=float(o.weight_decay) if o.name == "adamw" else 0.0,
                          clip_norm=float(o.clip_norm), warmup_steps=int(o.warmup_steps),
                          grad_accum=int(config.train.grad_accum))


def clip_spec(config):
    from m3ddm_jax.data.video_folder import ClipSpec  # noqa: PLC0415

    d = config.data
    return ClipSpec(num_frames=int(d.num_frames), num_global_frames=int(d.num_global_frames), size=int(d.size),
                    global_size=int(d.global_size), max_stride=int(d.max_stride), min_frames=int(d.min_frames),
                    crop_scale=tuple(d.crop_scale), crop_ratio=tuple(d.crop_ratio), global_crop=bool(d.global_crop),
                    max_retries=int(d.max_retries), cache_dir=str(d.get("cache_dir", "") or ""))


def unet_options(config) -> dict:
    m = config.model
    budget = float(m.attention_budget_mib)
    return dict(dtype=_dtype(m.compute_dtype), remat=bool(m.remat), attention_impl=m.attention_impl,
                attention_budget_mib=budget if budget > 0 else None)


def _set_path(tree: dict, path: tuple, value) -> None:
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value


def load_models(config, shardings: S.Shardings):
    """``(unet graphdef, params, batch_stats, vae graphdef, vae state, unet config)``; the U-Net's arrays are
    placed straight into their shardings (never whole on one device)."""
    from m3ddm_jax.interop.unet import abstract_unet, load_unet_flat  # noqa: PLC0415
    from m3ddm_jax.interop.vae import load_vae  # noqa: PLC0415
    from m3ddm_jax.models.unet3d import UNet3DConfig, unet_from_config  # noqa: PLC0415

    m = config.model
    opts = unet_options(config)
    init = str(m.init or "")
    unet_folder, vae_folder = _resolve(init, str(m.vae))
    if unet_folder is not None:
        cfg, flat = load_unet_flat(unet_folder)
        abstract = abstract_unet(cfg, **opts)
        gd, abs_params, abs_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)

        def place(abs_state, shard_fn):
            out = {}
            for path, var in nnx.to_flat_state(abs_state):
                ref = var.get_value() if hasattr(var, "get_value") else var.value
                arr = np.asarray(flat[path])
                arr = arr.astype(ref.dtype) if arr.dtype != ref.dtype else arr
                _set_path(out, tuple(path), jax.device_put(arr, shard_fn(ref)))
            return out

        params = place(abs_params, shardings.for_param)
        stats = place(abs_stats, lambda _: shardings.replicated)
        log.info("U-Net initialised from %s", unet_folder)
    else:
        src = str(m.unet_config or "")
        if not src:
            raise ConfigError("model.init is empty: give model.unet_config (a config.json or U-Net folder) for a "
                              "random initialisation")
        p = Path(src)
        cfg = UNet3DConfig.from_json_file(p / "config.json" if p.is_dir() else p)
        abstract = nnx.eval_shape(lambda: unet_from_config(cfg, 0, **opts))
        gd, abs_params, abs_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
        shapes = (nnx.to_pure_dict(abs_params), nnx.to_pure_dict(abs_stats))
        out_sh = (shardings.params_tree(shapes[0]), shardings.replicated_tree(shapes[1]))

        @functools.partial(jax.jit, out_shardings=out_sh)
        def init_fn():
            model = unet_from_config(cfg, int(config.seed), **opts)
            _, p_, s_ = nnx.split(model, nnx.Param, nnx.BatchStat)
            return nnx.to_pure_dict(p_), nnx.to_pure_dict(s_)

        params, stats = init_fn()
        log.info("U-Net randomly initialised from %s", src)
    vae = load_vae(vae_folder, dtype=_dtype(m.vae_compute_dtype) or jnp.float32)
    vgd, vstate = nnx.split(vae)
    vstate = jax.device_put(vstate, shardings.replicated)
    return gd, params, stats, vgd, vstate, cfg, vae.config


def _resolve(init: str, vae: str):
    """``(unet folder or None, vae folder)``."""
    from m3ddm_jax import weights as W  # noqa: PLC0415

    if init:
        return W.resolve_weights(init, vae or None)
    vp = Path(vae).expanduser()
    if vp.exists():
        return None, (vp / "vae" if (vp / "vae").is_dir() else vp)
    if W._looks_like_repo_id(vae):
        folder = W._download(vae, W.DEFAULT_VAE_SUBFOLDER, f"the VAE {vae}")
        return None, W._cached_flax(folder, "vae", vae)
    raise UserError(f"VAE weights not found: {vae}")


# -- compiled steps, shared between Trainer instances of one process ------------------------------------

_COMPILED: dict = {}


def _compiled(key, build):
    if key not in _COMPILED:
        _COMPILED[key] = build()
    return _COMPILED[key]


@dataclasses.dataclass
class History:
    steps: list = dataclasses.field(default_factory=list)
    losses: list = dataclasses.field(default_factory=list)
    data_indices: list = dataclasses.field(default_factory=list)
    val: list = dataclasses.field(default_factory=list)
    skipped: int = 0
    skipped_files: list = dataclasses.field(default_factory=list)
    stopped_by: str = ""


class Trainer:
    def __init__(self, config, workdir: str | os.PathLike, *, mesh=None):
        self.config = config
        self.workdir = Path(workdir)
        self.is_main = jax.process_index() == 0
        check_config(config)
        if not str(config.data.dir or ""):
            raise ConfigError("no video folder: pass --config.data.dir=PATH")
        self.step_cfg = step_config(config)
        self.spec = clip_spec(config)
        self.spec.validate()
        self.step_cfg.validate()

        self.mesh = mesh if mesh is not None else S.make_mesh(dict(config.mesh.shape), tuple(config.mesh.axes))
        self.shardings = S.Shardings(self.mesh, [tuple(r) for r in config.sharding.rules],
                                     int(config.sharding.min_shard_elements))
        gb = int(config.train.batch_size)
        if gb < 1 or gb % self.shardings.batch_size_divisor:
            raise ConfigError(f"train.batch_size {gb} must be a positive multiple of the batch mesh size "
                              f"{self.shardings.batch_size_divisor}")
        if gb % jax.process_count():
            raise ConfigError(f"train.batch_size {gb} must divide over {jax.process_count()} processes")
        self.global_batch = gb
        self.local_batch = gb // jax.process_count()

        from m3ddm_jax.data.video_folder import find_videos  # noqa: PLC0415

        self.train_files = find_videos(config.data.dir, config.data.train_split)
        self.val_files = find_videos(config.data.dir, config.data.val_split) if config.data.val_split else []
        if not self.train_files:
            raise UserError(f"no videos (mp4, avi, mov, webm) under {config.data.dir}")

        # models and state
        (self.unet_gd, params, stats, self.vae_gd, self.vae_state, self.unet_config,
         self.vae_config) = load_models(config, self.shardings)
        self.step_cfg = dataclasses.replace(self.step_cfg, latent_factor=int(self.vae_config.downscale))
        self.tx, self.schedule = optimizer(config)
        self.fns = StepFns(self.unet_gd, self.vae_gd, self.tx, self.schedule, self.step_cfg)
        ema = self.step_cfg.ema_decay > 0
        shapes = jax.eval_shape(lambda p, s: init_state(p, s, self.tx, seed=0, ema=ema), params, stats)
        self.state_sh = state_shardings(shapes, self.shardings)
        tx = self.tx
        init = _compiled(("init", self.unet_gd, _opt_key(config), self.mesh, jax.tree.structure(shapes),
                          tuple(sorted(self.shardings.rules.items())), self.shardings.min_shard_elements),
                         lambda: jax.jit(lambda p, s, seed: init_state(p, s, tx, seed=seed, ema=ema),
                                         out_shardings=self.state_sh))
        self.state = init(params, stats, jnp.int32(int(config.seed)))
        del params, stats
        self._build_steps(shapes)

        # data
        self.train_loader = self._loader(self.train_files, shuffle=True, seed=int(config.seed), name="train")
        self.train_iter = iter(self.train_loader)

        # checkpoints and logs
        self.ckpt = Checkpointer(self.workdir / "checkpoints", int(config.checkpoint.keep),
                                 bool(config.checkpoint.async_save))
        self.writer = MetricWriter(self.workdir, enabled=self.is_main, tensorboard=bool(config.log.tensorboard))
        self.skipped = 0
        self.skipped_files: set[str] = set()
        self.restored_step = None
        if self.ckpt.latest_step() is not None:
            self.restore()
        # rows logged after the step training continues from (by a run that was killed or stopped before its
        # next checkpoint) are superseded: they are about to be logged again, from the same state
        dropped = self.writer.rewind(self.step if self.restored_step is not None else None)
        if dropped:
            self._info(f"metrics.jsonl: {dropped} row(s) logged after step {self.step} by an interrupted run moved "
                       f"to {self.writer.superseded_name}")

    # -- building ------------------------------------------------------------------------------------
    def _build_steps(self, shapes):
        sh = self.shardings
        batch_shapes = self.batch_shapes(self.global_batch)
        batch_sh = sh.batch_tree(batch_shapes)
        vae_sh = sh.replicated_tree(self.vae_state)
        metric_sh = sh.replicated
        key = (self.unet_gd, self.vae_gd, self.step_cfg, _opt_key(self.config), self.mesh,
               tuple(sorted(sh.rules.items())), sh.min_shard_elements, jax.tree.structure(shapes),
               tuple(sorted((k, v.shape) for k, v in batch_shapes.items())))
        fns = self.fns
        self.train_step = _compiled(("train",) + key, lambda: jax.jit(
            fns.train_step, in_shardings=(self.state_sh, vae_sh, batch_sh, sh.replicated),
            out_shardings=(self.state_sh, metric_sh), donate_argnums=(0,)))
        self.eval_step = _compiled(("eval",) + key, lambda: jax.jit(
            fns.eval_step, in_shardings=(self.state_sh["params"], self.state_sh["batch_stats"], vae_sh, batch_sh,
                                         sh.replicated),
            out_shardings=(metric_sh, metric_sh)))

    def batch_shapes(self, batch: int) -> dict:
        s = self.spec
        return {"frames": jax.ShapeDtypeStruct((batch, s.num_frames, s.size, s.size, 3), jnp.uint8),
                "global_frames": jax.ShapeDtypeStruct((batch, s.num_global_frames, s.global_size, s.global_size, 3),
                                                      jnp.uint8),
                "fps": jax.ShapeDtypeStruct((batch,), jnp.float32)}

    def _loader(self, files, *, shuffle: bool, seed: int, name: str, num_epochs=None, batch=None):
        from m3ddm_jax.data.video_folder import make_loader  # noqa: PLC0415

        d = self.config.data
        return make_loader(files, self.spec, batch_size=batch or self.local_batch, seed=seed, shuffle=shuffle,
                           num_epochs=num_epochs, worker_count=int(d.worker_count),
                           worker_buffer_size=int(d.worker_buffer_size), name=name)

    # -- checkpoints ---------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(jax.device_get(self.state["step"]))

    def save(self, force: bool = True) -> None:
        meta = {"step": self.step, "skipped": self.skipped, "skipped_files": sorted(self.skipped_files),
                "config": str(self.config.name)}
        self.ckpt.save(self.step, self.state, self.train_iter.get_state(), meta, force=force)

    def restore(self, step: int | None = None) -> None:
        """Restore ``step`` (default: the newest readable checkpoint; an unreadable newer one is set aside with
        a warning, see :meth:`Checkpointer.restore`)."""
        target = {k: (None if v is None else abstract_like(v, self.state_sh[k])) for k, v in self.state.items()}
        state, data_state, meta = self.ckpt.restore(target, step)
        self.state = state
        if data_state is not None:
            self.train_iter.set_state(data_state)
        self.skipped = int(meta.get("skipped", 0))
        self.skipped_files = set(meta.get("skipped_files", []))
        self.restored_step = self.step
        self._info(f"resumed from {self.ckpt.directory / str(self.step)} (step {self.step})")

    # -- logging -------------------------------------------------------------------------------------
    def _info(self, msg: str) -> None:
        if self.is_main:
            log.info(msg)
            print(msg, flush=True)

    def _count_skipped(self, batch) -> None:
        ids = np.asarray(batch["skipped"]).reshape(-1)
        ids = ids[ids >= 0]
        if ids.size:
            self.skipped += int(ids.size)
            new = {self.train_files[i] for i in ids.tolist()} - self.skipped_files
            self.skipped_files |= new
            if new:
                self._info(f"skipped unreadable or too short video(s): {', '.join(sorted(new))} "
                           f"({self.skipped} skips so far)")

    # -- validation and preview ----------------------------------------------------------------------
    def validate(self) -> float | None:
        if not self.val_files:
            return None
        cfg = self.config
        vb = int(cfg.val.batch_size) or self.global_batch
        if vb != self.global_batch:
            raise ConfigError("val.batch_size must equal train.batch_size (one compiled shape)")
        loader = self._loader(self.val_files, shuffle=False, seed=int(cfg.seed) + 1, name="val", num_epochs=None)
        key = jax.random.fold_in(jax.random.key(int(cfg.seed)), 2**31 - 1)
        num = den = 0.0
        it = iter(loader)
        for i in range(int(cfg.val.batches)):
            batch = next(it)
            gbatch = S.host_batch_to_global({k: batch[k] for k in ("frames", "global_frames", "fps")}, self.shardings)
            n, d = self.eval_step(self.state["params"], self.state["batch_stats"], self.vae_state, gbatch,
                                  jax.random.fold_in(key, i))
            num += float(n)
            den += float(d)
        loss = num / max(den, 1.0)
        self.writer.scalars(self.step, {"val/loss": loss})
        self._info(f"step {self.step}: validation loss {loss:.5f} ({int(cfg.val.batches)} batches)")
        return loss

    def unet_model(self, use_ema: bool = False) -> nnx.Module:
        params = self.state["ema"] if (use_ema and self.state.get("ema") is not None) else self.state["params"]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            params = multihost_utils.process_allgather(params, tiled=True)
            stats = multihost_utils.process_allgather(self.state["batch_stats"], tiled=True)
        else:
            stats = self.state["batch_stats"]
        return nnx.merge(self.unet_gd, jax.device_get(params), jax.device_get(stats))

    def preview(self) -> dict | None:
        """Outpaint the first validation video through the inference API; write it and (optionally) metrics."""
        cfg = self.config.preview
        if not self.val_files or jax.process_count() > 1:
            return None
        from m3ddm_jax.outpaint.pipeline import OutpaintConfig, Outpainter  # noqa: PLC0415
        from m3ddm_jax.video import read_video, write_video  # noqa: PLC0415

        video = read_video(self.val_files[0], max_frames=int(cfg.frames))
        h, w = video.frames.shape[1:3]
        top, left, kh, kw = M.eval_keep_box(h, w, float(cfg.crop_ratio), "horizontal")
        src = video.frames[:, top:top + kh, left:left + kw]
        vae = nnx.merge(self.vae_gd, self.vae_state)
        ratio = str(cfg.ratio or "") or f"{w}:{h}"  # default: back to the ground truth's own shape
        op = Outpainter(self.unet_model(), vae, OutpaintConfig(ratio=ratio, output_size=int(cfg.output_size),
                                                               steps=int(cfg.steps), seed=int(self.config.seed)))
        result = op(src, video.fps)
        out_dir = self.workdir / "previews"
        out_dir.mkdir(parents=True, exist_ok=True)
        write_video(out_dir / f"step_{self.step:07d}.mp4", result.frames, video.fps)
        scores = {}
        if cfg.metrics:
            import cv2  # noqa: PLC0415

            from m3ddm_jax import metrics  # noqa: PLC0415 - lazily: optional validation metrics

            oh, ow = result.frames.shape[1:3]
            gt = np.stack([cv2.resize(f, (ow, oh), interpolation=cv2.INTER_AREA) for f in video.frames])
            x, y = jnp.asarray(gt, jnp.float32) / 255.0, jnp.asarray(result.frames, jnp.float32) / 255.0
            scores = {"preview/mse": float(jnp.mean(metrics.mse(x, y))), "preview/psnr": float(jnp.mean(metrics.psnr(x, y))),
                      "preview/ssim": float(jnp.mean(metrics.ssim(x, y)))}
            self.writer.scalars(self.step, scores)
        self._info(f"step {self.step}: preview written ({result.summary()})"
                   + (" " + " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in scores.items()) if scores else ""))
        return scores

    # -- export --------------------------------------------------------------------------------------
    def export(self, out_folder: str | os.PathLike | None = None) -> Path | None:
        """Write the trained U-Net in the released PyTorch layout (config.json + weights) via the converter."""
        from m3ddm_jax.interop.unet import export_unet_torch  # noqa: PLC0415

        cfg = self.config.export
        model = self.unet_model(use_ema=bool(cfg.use_ema))
        if not self.is_main:
            return None
        out = Path(out_folder) if out_folder else self.workdir / "export" / "unet"
        export_unet_torch(model, out, fmt=str(cfg.format), dtype=_dtype(cfg.dtype))
        self._info(f"exported the U-Net (PyTorch layout) to {out}")
        return out

    # -- the loop ------------------------------------------------------------------------------------
    def run(self, stop_at: int | None = None) -> History:
        cfg = self.config
        total = int(cfg.train.steps)
        stop_at = total if stop_at is None else min(int(stop_at), total)
        hist = History()
        stop = {"signal": None}
        old_handler = None
        if threading_is_main():
            old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.__setitem__("signal", signum))
        try:
            step = self.step
            self._info(f"training {cfg.name}: step {step} -> {stop_at}, global batch {self.global_batch}, mesh "
                       f"{dict(self.mesh.shape)}, {len(self.train_files)} train / {len(self.val_files)} val videos")
            every_val = int(cfg.val.every)
            repeat_noise = bool(cfg.train.get("repeat_noise", False))
            if every_val > 0 and step == 0 and self.val_files:
                hist.val.append((step, self.validate()))
            t_last, n_last = time.perf_counter(), 0
            last_saved = step if self.restored_step == step else None
            while step < stop_at:
                batch = next(self.train_iter)
                self._count_skipped(batch)
                hist.data_indices.append(np.asarray(batch["index"]).tolist())
                gbatch = S.host_batch_to_global({k: batch[k] for k in ("frames", "global_frames", "fps")},
                                                self.shardings)
                draw = jnp.int32(0 if repeat_noise else step)
                self.state, metrics = self.train_step(self.state, self.vae_state, gbatch, draw)
                step += 1
                n_last += 1
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise UserError(f"non-finite loss {loss} at step {step}: lower optim.lr or enable clipping")
                hist.steps.append(step)
                hist.losses.append(loss)
                if step % int(cfg.log.every) == 0 or step == stop_at:
                    dt = time.perf_counter() - t_last
                    cps = n_last * self.global_batch / max(dt, 1e-9)
                    vals = {"train/loss": loss, "train/lr": float(metrics["lr"]),
                            "train/grad_norm": float(metrics["grad_norm"]), "train/clips_per_s": cps,
                            "data/skipped": self.skipped}
                    self.writer.scalars(step, vals)
                    self._info(f"step {step}/{total}  loss {loss:.5f}  lr {vals['train/lr']:.2e}  "
                               f"|g| {vals['train/grad_norm']:.3g}  {cps:.2f} clips/s"
                               + (f"  skipped {self.skipped}" if self.skipped else ""))
                    t_last, n_last = time.perf_counter(), 0
                if every_val > 0 and step % every_val == 0:
                    hist.val.append((step, self.validate()))
                if int(cfg.preview.every) > 0 and step % int(cfg.preview.every) == 0:
                    self.preview()
                if step % int(cfg.checkpoint.every) == 0:
                    self.save()
                    last_saved = step
                if self._preempted(stop, step):
                    hist.stopped_by = "SIGTERM"
                    self._info(f"preemption signal at step {step}: checkpointing and stopping")
                    break
            if last_saved != step:
                self.save()
            self.ckpt.wait()
            if step >= total and bool(cfg.export.at_end):
                self.export()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
            self.writer.flush()
        hist.skipped = self.skipped
        hist.skipped_files = sorted(self.skipped_files)
        return hist

    def _preempted(self, stop: dict, step: int) -> bool:
        if stop["signal"] is not None:
            return True
        if jax.process_count() > 1:
            try:
                from jax.experimental import multihost_utils  # noqa: PLC0415

                return bool(multihost_utils.reached_preemption_sync_point(step))
            except Exception:  # noqa: BLE001 - no preemption service configured
                return False
        return False

    def close(self) -> None:
        self.ckpt.close()
        self.writer.close()


def threading_is_main() -> bool:
    import threading  # noqa: PLC0415

    return threading.current_thread() is threading.main_thread()


def _opt_key(config) -> tuple:
    o = config.optim
    return (o.name, float(o.lr), float(o.b1), float(o.b2), float(o.eps), float(o.weight_decay), float(o.clip_norm),
            int(o.warmup_steps), int(config.train.grad_accum), float(o.ema_decay))



