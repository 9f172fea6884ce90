"""``outpaint(frames, ...)``: a whole video through the coarse-to-fine M3DDM sampler.

Data flows one way: frames -> geometry and canvases -> VAE latents -> per-window jitted sampler ->
latents -> VAE decode -> composite -> output frames. Compiled units (each once per shape, reused by every
window and pass of a video): the VAE encode chunk, the VAE decode chunk, the denoising loop.

Faithful to the reference (spec section 5) in everything that shapes the result: canvas and placement,
Telea init, latent mask, 16-frame windows at strides coarse to fine, known-frame injection, two-factor
guidance (2, 4), 50 PLMS steps from t=961, the same start noise for every window, global frames squashed
to ``output_size`` squares. Different on purpose: every frame written exactly once (tail fix), the known
region is the exact input, global latents are encoded once per video, only frames that are written are
decoded, ``seed`` fixes every random draw (VAE posterior samples included), canvases round to 64 pixels.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.diffusion.schedule import ScheduleConfig
from m3ddm_jax.errors import ConfigError
from m3ddm_jax.outpaint import canvas as cv
from m3ddm_jax.outpaint.geometry import Geometry, make_geometry
from m3ddm_jax.outpaint.sampler import Guidance, assemble_conditions, build_denoiser, report_steps, start_latent
from m3ddm_jax.outpaint.windows import WINDOW, global_frame_indices, plan_windows, window_waves


@dataclasses.dataclass(frozen=True)
class OutpaintConfig:
    ratio: str | None = "16:9"                  # target W:H, or None with ``pad``
    pad: tuple[int, int, int, int] | None = None  # left, right, top, bottom in source pixels
    output_size: int = 256                      # long side of the output box
    canvas: str = "square"                      # "square" (reference) or "tight"
    strides: tuple[int, ...] = (15, 5, 1)
    num_global_frames: int = 16
    limit: int | None = None                    # outpaint only the first N frames
    sampler: str = "plms"
    steps: int = 50
    guidance_scale: float = 2.0                 # local (masked video) condition
    global_guidance_scale: float = 4.0          # global frames
    seed: int = 6
    full_res: bool = False                      # keep source pixels at source size
    feather: int = 0                            # full-res seam feather width in output pixels
    vae_chunk: int = 8                          # frames per VAE encode/decode call
    guidance_rows: int = 3                      # two-factor guidance: 3 (rows the combination reads) or 4 (reference)
    schedule: str = "waves"                     # "waves" (independent windows at once) or "sequential" (one by one)
    window_batch: int = 0                       # most windows per denoiser call (0: auto, from devices and memory)
    pad_calls: str = "pow2"                     # pad a call to the next devices x 2^i windows, or "max" (window_batch)
    devices: int = 0                            # local devices to use (0: all); the window axis is sharded over them
    return_latents: bool = False                # keep every frame's final latent in the result (``latents``)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be positive, got {self.steps}")
        if self.num_global_frames < 1:
            raise ConfigError(f"num_global_frames must be positive, got {self.num_global_frames}")
        if self.vae_chunk < 1:
            raise ConfigError(f"vae_chunk must be positive, got {self.vae_chunk}")
        if self.feather < 0:
            raise ConfigError(f"feather must be non-negative, got {self.feather}")
        if self.guidance_rows not in (3, 4):
            raise ConfigError(f"guidance_rows must be 3 or 4, got {self.guidance_rows}")
        if self.schedule not in ("waves", "sequential"):
            raise ConfigError(f"schedule must be 'waves' or 'sequential', got {self.schedule!r}")
        if self.pad_calls not in ("pow2", "max"):
            raise ConfigError(f"pad_calls must be 'pow2' or 'max', got {self.pad_calls!r}")
        if self.window_batch < 0 or self.devices < 0:
            raise ConfigError("window_batch and devices must be >= 0 (0: automatic)")


@dataclasses.dataclass
class OutpaintResult:
    frames: np.ndarray          # uint8 (N, H, W, 3): output (box size, or full resolution)
    geometry: Geometry
    windows: int
    seconds: float
    copied: bool = False        # nothing to outpaint: the frames were copied (resized)
    fps: float | None = None    # the input's frame rate (what the output is written at)
    steps: int = 0              # denoising steps per window
    source: object = None       # the input's path when known (its audio is kept by export_to_video)
    frame_shape: tuple | None = None  # (N, H, W, 3) of the output; ``frames`` is None when they went to a sink
    waves: int = 0              # groups of windows that ran at once (== windows for the sequential schedule)
    latents: np.ndarray | None = None  # (frames, h, w, 4) final latents, with ``return_latents=True``

    @property
    def shape(self) -> tuple:
        """``(N, H, W, 3)`` of the output frames (also when they were written to a sink, not kept)."""
        return tuple(self.frames.shape) if self.frames is not None else tuple(self.frame_shape)

    def summary(self) -> str:
        g = self.geometry
        n, oh, ow = self.shape[:3]
        waves = f" in {self.waves} waves" if self.waves and self.waves != self.windows else ""
        what = "copied (nothing to outpaint)" if self.copied else f"{self.windows} windows{waves} x {self.steps} steps"
        return f"{n} frames {g.src_w}x{g.src_h} -> {ow}x{oh}, {what}, {self.seconds:.1f} s"


class Outpainter:
    """Holds the split models and the compiled units; call it on one video at a time."""

    def __init__(self, unet, vae, config: OutpaintConfig = OutpaintConfig(), schedule: ScheduleConfig = ScheduleConfig()):
        config.validate()
        self.config = config
        self.guidance = Guidance(config.guidance_scale, config.global_guidance_scale, rows=config.guidance_rows)
        self.mesh = window_mesh(config.devices)
        self.denoiser, self.unet_state = build_denoiser(unet, config.sampler, config.steps, self.guidance, schedule,
                                                        mesh=self.mesh)
        self._unet = unet
        self.schedule = schedule
        self.vae_graphdef, self.vae_state = nnx.split(vae)
        self.latent_factor = vae.config.downscale if hasattr(vae.config, "downscale") else 8

    # -- VAE ------------------------------------------------------------------------------------------
    def encode(self, images: np.ndarray, key) -> jax.Array:
        """float [-1, 1] ``(N, H, W, 3)`` -> scaled latents ``(N, h, w, 4)`` (posterior samples)."""
        from m3ddm_jax.models.vae import encode_video  # noqa: PLC0415

        return encode_video((self.vae_graphdef, self.vae_state), jnp.asarray(images)[None], key, self.config.vae_chunk)[0]

    def decode(self, latents: jax.Array) -> np.ndarray:
        from m3ddm_jax.models.vae import decode_video  # noqa: PLC0415

        return np.asarray(decode_video((self.vae_graphdef, self.vae_state), latents[None], self.config.vae_chunk)[0])

    # -- videos --------------------------------------------------------------------------------------
    def window_batch(self, latent_hw: tuple[int, int]) -> int:
        """Windows per denoiser call for a canvas of ``latent_hw`` latents: ``config.window_batch`` rounded up to
        a multiple of the devices, or (auto) the devices times what one device holds (see :func:`auto_windows`)."""
        n_dev = self.denoiser.num_devices
        if self.config.schedule == "sequential":
            return n_dev
        b = self.config.window_batch or n_dev * auto_windows(self.mesh, self._unet, latent_hw, self.guidance)
        return -(-b // n_dev) * n_dev

    def call_size(self, k: int, batch: int) -> int:
        """The padded size of a call of ``k <= batch`` windows: ``batch`` (``pad_calls="max"``: one compile per
        canvas shape), or the smallest devices x 2^i >= k (``"pow2"``, default: at most 1 + log2(batch / devices)
        compiles per canvas shape, and a wave of one window does not pay for ``batch``)."""
        n_dev = self.denoiser.num_devices
        if self.config.pad_calls == "max":
            return batch
        size = n_dev
        while size < k:
            size *= 2
        return min(size, batch)

    def __call__(self, frames, fps: float, progress: bool | Callable = False,
                 sink: Callable[[np.ndarray], None] | None = None) -> OutpaintResult:
        """Outpaint uint8 ``frames (N, H, W, 3)``, or a lazy source of them (a
        :class:`~m3ddm_jax.video.VideoReader`, or any object with ``num_frames``, ``height``, ``width`` and an
        ``__iter__`` that yields the frames in order, afresh on every call): frames are read as a stream and kept
        only at model resolution (a ``full_res`` run reads the source a second time while emitting). The two
        give bit-identical results.

        ``sink``: None (the result holds every output frame), or a function called with each output frame
        ``(H, W, 3)`` in frame order as soon as it and all frames before it are final (the result's ``frames``
        is then None; ``shape`` says what was emitted), e.g. :meth:`m3ddm_jax.video.VideoWriter.write`.
        ``progress``: False, True (a tqdm bar per denoising step with an ETA, left on screen with the totals), or
        a callable ``progress(Progress)`` called after every denoising step and denoiser call (a UI's hook; an
        exception raised from it stops the run at the end of the current call and propagates)."""
        return self.outpaint_many([(frames, fps, sink)], progress=progress)[0]

    def outpaint_many(self, jobs, progress: bool | Callable = False) -> list[OutpaintResult]:
        """Outpaint several videos with this one setting: ``jobs`` is a sequence of ``(frames, fps)`` or
        ``(frames, fps, sink)`` (``frames`` and ``sink`` as for :meth:`__call__`). Returns one
        :class:`OutpaintResult` per job, in order; each ``seconds`` is the time until that video was done.

        Videos whose canvases have the same latent shape run together: wave ``k`` of every video (see
        :func:`~m3ddm_jax.outpaint.windows.window_waves`) goes through the denoiser in calls of
        at most :meth:`window_batch` windows, each call padded to :meth:`call_size` (copies of a window whose
        result is dropped), each padded size compiled once per canvas shape. The result equals
        running the windows one by one in plan order up to float rounding (batched convolutions)."""
        t0 = time.perf_counter()
        jobs = [tuple(j) + (None,) * (3 - len(j)) for j in jobs]
        results: list[OutpaintResult | None] = [None] * len(jobs)
        videos: list[_VideoRun] = []
        for i, (frames, fps, sink) in enumerate(jobs):
            v = self._prepare(frames, float(fps), sink, t0)
            if isinstance(v, OutpaintResult):
                results[i] = v
            else:
                v.index = i
                videos.append(v)
        # same latent canvas -> same compiled loop; videos of one shape share calls
        by_shape: dict[tuple[int, int], list[_VideoRun]] = {}
        for v in videos:
            by_shape.setdefault(v.latent_hw, []).append(v)
        plan = []  # (shape, [(video, window index)] per call)
        for hw, vs in by_shape.items():
            b = self.window_batch(hw)
            for level in range(max(len(v.waves) for v in vs)):
                items = [(v, wi) for v in vs if level < len(v.waves) for wi in v.waves[level]]
                plan += [(self.call_size(len(items[k:k + b]), b), items[k:k + b]) for k in range(0, len(items), b)]
        for _, items in plan:
            for v in {id(v): v for v, _ in items}.values():
                v.calls_left += 1
        n_frames = sum(v.n_keep for v in videos)
        bar = ProgressReporter(progress, len(plan), self.denoiser.spec.num_calls, n_frames=n_frames)
        with bar, report_steps(bar.step_done):
            for ci, (b, items) in enumerate(plan):
                bar.window_start(ci)
                self._run_call(items, b)
                bar.window_done(ci)
                for v in {id(v): v for v, _ in items}.values():
                    v.calls_left -= 1
                    if v.calls_left == 0:
                        results[v.index] = v.finish(time.perf_counter() - t0, self.config.steps, self.config.return_latents)
        return results

    def _prepare(self, frames, fps: float, sink, t0: float):
        """Everything a video needs before its first window: geometry, frames at model size, global latents, plan."""
        cfg = self.config
        n, src_h, src_w = _source_shape(frames)
        g = make_geometry(src_h, src_w, ratio=cfg.ratio if cfg.pad is None else None, pad=cfg.pad,
                          output_size=cfg.output_size, canvas=cfg.canvas)
        fhw = (g.frame_h, g.frame_w)
        if g.nothing_to_outpaint:
            emit = _Emitter(n, sink)
            for i, f in enumerate(_frames_of(frames, n)):
                emit.put(i, f if cfg.full_res else self._crop_box(self._paste(cv.resize_frames(f[None], fhw), g), g)[0])
            return emit.result(g, 0, time.perf_counter() - t0, copied=True, fps=fps)

        v = _VideoRun()
        key = jax.random.key(cfg.seed)
        k_global, k_eps0, v.k_windows = jax.random.split(key, 3)
        v.g, v.fps, v.latent_hw = g, fps, (g.canvas_h // self.latent_factor, g.canvas_w // self.latent_factor)
        h, w = v.latent_hw
        v.n_keep = min(n, cfg.limit) if cfg.limit else n
        # One pass over the source: frames at model resolution (those that are outpainted) and the global frames,
        # 16 evenly spaced source frames squashed to output_size squares.
        side = max(8, cfg.output_size // 8 * 8)
        gidx = global_frame_indices(n, cfg.num_global_frames)
        v.small = np.empty((v.n_keep, *fhw, 3), np.uint8)
        glob = np.empty((len(gidx), side, side, 3), np.uint8)
        for i, f in enumerate(_frames_of(frames, n)):
            if i < v.n_keep:
                v.small[i] = cv.resize_frames(f[None], fhw)[0]
            for k in np.flatnonzero(gidx == i):
                glob[k] = cv.resize_frames(f[None], (side, side))[0]
        v.global_latents = self.encode(cv.to_model_range(glob), k_global)

        v.windows = plan_windows(n, cfg.strides, fps=fps, limit=cfg.limit)
        v.waves = window_waves(v.windows) if cfg.schedule == "waves" else [[i] for i in range(len(v.windows))]
        n_out = max(f for wdw in v.windows for f in wdw.frames) + 1
        v.eps0 = jax.random.normal(k_eps0, (1, WINDOW, h, w, 4), jnp.float32)  # same for every window (reference)
        _, _, v.mask = cv.build_canvases(v.small[:1], g, inpaint=False)
        v.m_lat = jnp.asarray(cv.latent_mask(v.mask, self.latent_factor), jnp.float32)
        v.latents = jnp.zeros((n_out, h, w, 4), jnp.float32)
        v.has_latent = np.zeros(n_out, bool)
        # output frames leave in frame order; --full-res re-reads the source
        v.emit = _Emitter(v.n_keep, sink)
        v.src_again = _frames_of(frames, n) if cfg.full_res else None
        v.calls_left = 0
        v.finisher = self._finisher(v)
        return v

    def _finisher(self, v: "_VideoRun"):
        g = v.g

        def finish(i: int, img: np.ndarray) -> np.ndarray:
            if self.config.full_res:
                return self._full_res(img, next(v.src_again), g)
            return self._crop_box(img[None], g)[0]

        return finish

    def _run_call(self, items: list[tuple["_VideoRun", int]], batch: int) -> None:
        """One denoiser call over the windows ``items`` (padded to ``batch``): conditions from the latents the
        earlier calls wrote, then the latents, decode and composite of every window, in plan order."""
        cols = {k: [] for k in ("x", "cond", "uncond", "mask", "umask", "glob", "fps")}
        prepared = []
        for v, wi in items:
            wdw = v.windows[wi]
            idx = np.asarray(wdw.frames)
            init_u8, masked_u8, _ = cv.build_canvases(v.small[idx], v.g)
            kw = jax.random.fold_in(v.k_windows, wi)
            black = np.full((1, v.g.canvas_h, v.g.canvas_w, 3), -1.0, np.float32)
            enc = self.encode(np.concatenate([cv.to_model_range(init_u8), cv.to_model_range(masked_u8), black]), kw)
            z_init, z_mask, z_black = enc[:WINDOW], enc[WINDOW:2 * WINDOW], enc[2 * WINDOW]
            known = jnp.asarray(np.asarray(wdw.known))
            cond, uncond, lmask, umask = assemble_conditions(z_mask, z_black, v.m_lat, v.latents[idx], known)
            x = start_latent(z_init[None], v.eps0, self.denoiser.spec, self.schedule)[0]
            for k, a in zip(cols, (x, cond, uncond, lmask, umask, v.global_latents, wdw.fps_cond)):
                cols[k].append(a)
            prepared.append((v, wi, idx, masked_u8))
        pad = batch - len(items)
        args = [jnp.stack(c + c[:1] * pad) for c in cols.values()]  # padding: copies of the first window
        args[-1] = args[-1].astype(jnp.float32)
        if self.mesh is not None:
            args = jax.device_put(args, self.denoiser.window_sharding)
        z0s = self.denoiser(self.unet_state, *args)
        z0s = jax.device_get(z0s) if self.mesh is not None and self.mesh.size > 1 else z0s
        for k, (v, wi, idx, masked_u8) in enumerate(prepared):
            wdw = v.windows[wi]
            z0 = jnp.asarray(z0s[k])
            # first occurrence wins (later slots of the same frame, e.g. padding, do not overwrite)
            new = [j for j in range(WINDOW) if not v.has_latent[idx[j]] and idx[j] not in idx[:j]]
            if new:
                v.latents = v.latents.at[idx[new]].set(z0[np.asarray(new)])
                v.has_latent[idx[new]] = True
            emit_j = [j for j in range(WINDOW) if wdw.emit[j]]
            if emit_j:
                images = cv.to_uint8(self.decode(z0[np.asarray(emit_j)]))
                comp = cv.composite(images, masked_u8[emit_j], v.mask)
                for j, img in zip(emit_j, comp):
                    v.emit.put(int(idx[j]), img, v.finisher)
        jax.block_until_ready(z0s)  # every step of this call has reported

    # -- output helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _paste(small: np.ndarray, g: Geometry) -> np.ndarray:
        return cv.build_canvases(small, g, inpaint=False)[1]

    @staticmethod
    def _crop_box(canvases: np.ndarray, g: Geometry) -> np.ndarray:
        return canvases[:, g.box_top:g.box_top + g.out_h, g.box_left:g.box_left + g.out_w]

    def _full_res(self, canvas_img: np.ndarray, source: np.ndarray, g: Geometry) -> np.ndarray:
        """Generated border upscaled to source scale around the untouched source frame."""
        import cv2  # noqa: PLC0415

        box = canvas_img[g.box_top:g.box_top + g.out_h, g.box_left:g.box_left + g.out_w]
        big = cv2.resize(box, (g.full_w, g.full_h), interpolation=cv2.INTER_CUBIC)
        t, l = g.full_top, g.full_left
        region = big[t:t + g.src_h, l:l + g.src_w]
        f = int(round(self.config.feather * g.full_w / g.out_w)) if self.config.feather else 0
        if f > 0:
            yy = np.minimum(np.arange(g.src_h), np.arange(g.src_h)[::-1])[:, None]
            xx = np.minimum(np.arange(g.src_w), np.arange(g.src_w)[::-1])[None, :]
            # only feather along sides that border generated content
            alpha = np.clip(np.minimum(yy if g.full_h > g.src_h else f, xx if g.full_w > g.src_w else f) / f, 0, 1)[..., None]
            region[:] = np.round(alpha * source + (1 - alpha) * region).astype(np.uint8)
        else:
            region[:] = source
        return big


class _VideoRun:
    """One video's state while its windows run (see :meth:`Outpainter.outpaint_many`)."""

    index: int
    calls_left: int

    def finish(self, seconds: float, steps: int, keep_latents: bool = False) -> OutpaintResult:
        if self.src_again is not None:
            self.src_again.close()  # a --limit run stops reading early: close the file now
        return self.emit.result(self.g, len(self.windows), seconds, fps=self.fps, steps=steps, waves=len(self.waves),
                                latents=np.asarray(self.latents) if keep_latents else None)


def window_mesh(devices: int = 0):
    """A one-axis mesh (``"windows"``) over the first ``devices`` local devices (0: all); None for one device."""
    local = jax.local_devices()
    n = devices or len(local)
    if n > len(local):
        raise ConfigError(f"devices={n}, but this process has {len(local)} local devices")
    if n == 1:
        return None
    from m3ddm_jax.train.sharding import make_mesh  # noqa: PLC0415

    return make_mesh({"windows": n}, ("windows",), devices=local[:n])


def auto_windows(mesh, unet, latent_hw: tuple[int, int], guidance: Guidance) -> int:
    """Windows one device holds per call: 1 where the device does not report its memory (CPU), else what fits
    in 80% of it after the parameters, by a per-window estimate scaled from a measurement (full model, 3 rows,
    16 frames at 32x32 latents, bf16: 1.6 GiB of activations per window), doubled for safety; at most 8."""
    dev = (mesh.devices.flat[0] if mesh is not None else jax.local_devices()[0])
    try:
        limit = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001  not every backend reports memory
        limit = None
    if not limit:
        return 1
    params = nnx.state(unet, nnx.Param)
    leaves = jax.tree_util.tree_leaves(params)
    param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    c0 = unet.config.block_out_channels[0]
    itemsize = jnp.dtype(unet.opts.dtype or leaves[0].dtype).itemsize
    h, w = latent_hw
    per_window = 2 * 1.6 * 2**30 * (guidance.unet_guidance / 3) * (h * w / 1024) * (c0 / 320) * (itemsize / 2)
    return int(max(1, min(8, (0.8 * limit - param_bytes) // per_window)))


def _source_shape(frames) -> tuple[int, int, int]:
    """``(N, H, W)`` of uint8 frames or of a lazy source (``num_frames``, ``height``, ``width``)."""
    if all(hasattr(frames, a) for a in ("num_frames", "height", "width")) and not isinstance(frames, np.ndarray):
        n, h, w = int(frames.num_frames), int(frames.height), int(frames.width)
        if n < 1:
            raise ConfigError("the video has no frames")
        return n, h, w
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ConfigError(f"expected uint8 frames (N, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ConfigError(f"expected uint8 frames, got {arr.dtype}")
    return arr.shape[:3]


def _frames_of(frames, n: int):
    """The frames one at a time, in order: ``(H, W, 3)`` views of an array, or one fresh pass over a source."""
    if isinstance(frames, np.ndarray) or not hasattr(frames, "num_frames"):
        arr = np.asarray(frames)
        return iter(arr[i] for i in range(n))
    def checked():
        count = 0
        for f in frames:
            if count == n:
                break
            f = np.asarray(f)
            if f.dtype != np.uint8 or f.shape != (frames.height, frames.width, 3):
                raise ConfigError(f"source frame {count} is {f.dtype} {f.shape}, expected uint8 "
                                  f"{(frames.height, frames.width, 3)}")
            yield f
            count += 1
        if count < n:
            raise ConfigError(f"the source gave {count} frames, {n} announced")
    return checked()


class _Emitter:
    """Output frames in frame order: into an array (no sink) or to ``sink`` as soon as every earlier frame is out.
    ``put(i, img, finish)`` takes frame ``i``'s canvas image; ``finish(i, img)`` (run in frame order, so it may
    read the source sequentially) makes the output frame."""

    def __init__(self, n: int, sink=None):
        self.n, self.sink = n, sink
        self.frames = None
        self.shape = None
        self.pending: dict[int, tuple] = {}
        self.next = 0

    def put(self, i: int, img: np.ndarray, finish=None) -> None:
        if i < self.next or i in self.pending:
            raise AssertionError(f"frame {i} emitted twice")
        self.pending[i] = (img, finish)
        while self.next in self.pending:
            img, finish = self.pending.pop(self.next)
            out = finish(self.next, img) if finish is not None else img
            if self.shape is None:
                self.shape = (self.n, *out.shape)
                if self.sink is None:
                    self.frames = np.zeros(self.shape, np.uint8)
            if self.sink is None:
                self.frames[self.next] = out
            else:
                self.sink(np.ascontiguousarray(out))
            self.next += 1

    def result(self, g: Geometry, windows: int, seconds: float, **kw) -> OutpaintResult:
        if self.next != self.n or self.pending:  # cannot happen: the schedule emits every frame once
            raise AssertionError(f"{self.next} of {self.n} frames emitted")
        return OutpaintResult(self.frames, g, windows, seconds, frame_shape=self.shape, **kw)


@dataclasses.dataclass
class Progress:
    """Where a run is: passed to a ``progress`` callable after every denoising step and window."""

    step: int = 0               # denoising calls done, over all windows
    total_steps: int = 0
    window: int = 0             # index of the current window
    windows: int = 0
    elapsed: float = 0.0        # seconds since the first step started (compile time excluded)
    eta: float | None = None    # seconds left, from the mean step time so far
    frames: int = 0             # frames of the output


class ProgressReporter:
    """Counts denoising steps (reported from inside the compiled loop) and windows; drives a tqdm bar
    (``enabled=True``) or a user callable. The bar stays on screen when done: frames, windows, steps, seconds."""

    def __init__(self, enabled: bool | Callable, n_windows: int, calls_per_window: int, n_frames: int = 0):
        self.callback = enabled if callable(enabled) else None
        self.state = Progress(total_steps=n_windows * calls_per_window, windows=n_windows, frames=n_frames)
        self.bar = None
        self._t_first = None
        self._error: BaseException | None = None
        if enabled is True:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=self.state.total_steps, unit="step", leave=True, dynamic_ncols=True,
                            desc=f"{n_frames} frames, {n_windows} windows: compiling")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            if exc[0] is None:
                st = self.state
                self.bar.set_description_str(f"{st.frames} frames, {st.windows} windows x "
                                             f"{st.total_steps // max(st.windows, 1)} steps")
            self.bar.close()
        return False

    def window_start(self, wi: int) -> None:
        self.state.window = wi
        if self.bar is not None and self._t_first is not None:
            self.bar.set_description_str(f"{self.state.frames} frames, window {wi + 1}/{self.state.windows}")

    def step_done(self, _i: int) -> None:
        """Called on the host by the compiled loop (see :func:`m3ddm_jax.outpaint.sampler.report_steps`)."""
        now = time.perf_counter()
        st = self.state
        if self._t_first is None:
            self._t_first = now  # the first step's end: compile time is behind us
            st.elapsed = 0.0
            if self.bar is not None:
                self.bar.set_description_str(f"{st.frames} frames, window {st.window + 1}/{st.windows}")
                self.bar.reset(total=st.total_steps)
                self.bar.update(st.step)
        st.step += 1
        st.elapsed = now - self._t_first
        done_timed = st.step - 1
        st.eta = (st.total_steps - st.step) * st.elapsed / done_timed if done_timed > 0 else None
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None and self._error is None:
            try:
                self.callback(dataclasses.replace(st))
            except BaseException as e:  # noqa: BLE001  raised again at the window's end, outside the compiled loop
                self._error = e

    def window_done(self, wi: int) -> None:
        self.state.window = wi + 1
        if self._error is not None:
            raise self._error
        if self.callback is not None:
            self.callback(dataclasses.replace(self.state))


class M3DDMPipeline:
    """The M3DDM+ outpainting pipeline, in the shape diffusers users know::

        pipe = M3DDMPipeline.from_pretrained("weights")     # folder from `python -m m3ddm_jax.download weights`
        result = pipe("clip.mp4", ratio="16:9")             # a path, a Video, or uint8 frames (+ fps)
        export_to_video(result, "clip_16-9.mp4")            # frame rate and audio of the source kept

    Models are loaded once; each distinct setting gets an :class:`Outpainter` whose compiled loop is shared
    (one compile per canvas shape and setting), so calling the pipeline again is cheap.
    """

    def __init__(self, unet, vae):
        self.unet = unet
        self.vae = vae
        self._outpainters: dict[OutpaintConfig, Outpainter] = {}

    @classmethod
    def from_pretrained(cls, weights=None, *, vae=None, dtype="float32", **unet_options) -> "M3DDMPipeline":
        """``weights``: a folder with ``unet/`` and ``vae/`` (``python -m m3ddm_jax.download DIR``), a U-Net
        folder, a Hugging Face repo id, ``"m3ddm+"`` (default) / ``"m3ddm"``, or ``"tiny"`` (the random tiny
        models that ship for tests). ``dtype``: compute dtype name or jnp dtype."""
        from m3ddm_jax.weights import load_models  # noqa: PLC0415

        if isinstance(dtype, str):
            names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
            if dtype not in names:
                raise ConfigError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
            dtype = names[dtype]
        unet, vae_model = load_models(weights, vae, dtype=dtype, **unet_options)
        return cls(unet, vae_model)

    def outpainter(self, **config) -> Outpainter:
        """The (cached) :class:`Outpainter` for :class:`OutpaintConfig` fields ``config``."""
        cfg = OutpaintConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        if cfg not in self._outpainters:
            self._outpainters[cfg] = Outpainter(self.unet, self.vae, cfg)
        return self._outpainters[cfg]

    def __call__(self, video, fps: float | None = None, *, ratio: str | None = "16:9", pad=None,
                 num_inference_steps: int = 50, progress: bool | Callable = True, sink=None, **config) -> OutpaintResult:
        """Outpaint ``video``: a file path (video or image; decoded as a stream, see
        :class:`~m3ddm_jax.video.VideoReader`), a :class:`~m3ddm_jax.video.VideoReader` or
        :class:`~m3ddm_jax.video.Video`, or uint8 frames ``(N, H, W, 3)`` with ``fps``. Keyword options are
        :class:`OutpaintConfig` fields (``output_size``, ``seed``, ``guidance_scale``, ``global_guidance_scale``,
        ``strides``, ``canvas``, ``full_res``, ``limit``, ...); ``pad=(left, right, top, bottom)`` replaces
        ``ratio``. ``sink``: a function taking each output frame in order (see :meth:`Outpainter.__call__`)."""
        import os  # noqa: PLC0415

        from m3ddm_jax.video import Video, VideoReader  # noqa: PLC0415

        source = None
        if isinstance(video, (str, os.PathLike)):
            video = VideoReader(video)
        if isinstance(video, (Video, VideoReader)):
            source = None if video.is_image else video.path
            fps = fps if fps is not None else (video.fps_fraction or video.fps)
            frames = video.frames if isinstance(video, Video) else video
        else:
            frames = video
            if fps is None:
                fps = getattr(video, "fps", None)
            if fps is None:
                raise ConfigError("fps is required when passing frames")
        if pad is not None:
            ratio = None
        op = self.outpainter(ratio=ratio, pad=tuple(pad) if pad is not None else None, steps=num_inference_steps,
                             **config)
        result = op(frames, float(fps), progress=progress, sink=sink)
        result.fps = fps
        result.source = source
        return result


def outpaint_video(frames: np.ndarray, fps: float = 30.0, *, weights=None, unet=None, vae=None, progress: bool = False,
                   **config) -> OutpaintResult:
    """Outpaint uint8 RGB ``frames (N, H, W, 3)`` in one call. Models come from ``unet``/``vae`` or ``weights``
    (see :func:`m3ddm_jax.weights.resolve_weights`); ``config`` are :class:`OutpaintConfig` fields."""
    if unet is None or vae is None:
        from m3ddm_jax.weights import load_models  # noqa: PLC0415

        unet, vae = load_models(weights)
    return Outpainter(unet, vae, OutpaintConfig(**config))(frames, fps, progress=progress)
