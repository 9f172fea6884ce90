"""Ahead-of-time compilation for TPU topologies: does the full model fit, and with which batch?

The TPU compiler (``libtpu``, extra ``.[tpu-aot]``) runs on any machine, TPU or not:
``jax.experimental.topologies.get_topology_desc`` gives compile-only devices of a slice (``v5e:2x4`` = a
v5e-8, ``v4:2x2x1``, ``v6e:2x4``, ``v5p:2x2x1``, multi-host ``v5e:16x16``), the project's own mesh and sharding
rules are applied to abstract arguments (``jax.eval_shape``: no array is ever allocated), and the real jitted
program is lowered and compiled for that topology. Its ``memory_analysis`` gives the per-device bytes; a
program that does not fit fails to compile (``RESOURCE_EXHAUSTED``), which becomes one line here.

    python -m m3ddm_jax.aot --topology v5e:2x4 --what train --config configs/m3ddm_plus.py \\
        --config.mesh.shape.fsdp=8 --config.model.compute_dtype=bfloat16 --max-batch
    python -m m3ddm_jax.aot --topology v5e:1x1 --what infer --dtype bfloat16

Programs:

* ``train``: the train step of :mod:`m3ddm_jax.train.step` exactly as :class:`~m3ddm_jax.train.trainer.Trainer`
  jits it (state, frozen VAE, uint8 batch and draw step with the trainer's shardings; the state donated): VAE
  encodes, masks, U-Net forward and backward, Adam with fp32 master weights, BatchNorm statistics. Model,
  data, optimizer, mesh and sharding come from the ml_collections config (``--config.a.b=value`` overrides).
* ``infer``: one call of the sampler's denoiser (:class:`~m3ddm_jax.outpaint.sampler.Denoiser`, the whole
  ``--steps`` PLMS loop under ``fori_loop``) over ``--batch`` windows (default 1; a wave of the whole-video
  schedule runs several), with ``--rows 3`` (default: uu, cu, cc, the rows two-factor guidance reads) or
  ``--rows 4`` (the reference's batch). Parameters are stored in ``--dtype``; with more than one chip they are
  sharded over all of them by the training rule (largest divisible dimension), and the window axis is
  sharded over the chips when the batch divides over them.

Printed per compile: per-device argument, output, alias, temporary and peak bytes (peak = arguments +
outputs - aliased + temporaries, what the compiler must fit), FLOPs per device (XLA cost analysis), the
step-time lower bound (FLOPs / the chip's bf16 peak) and the compile time. ``--max-batch`` finds the
largest global batch (a multiple of the batch mesh size) that compiles: two compiles measure the memory per
batch step, a bisection between the largest batch that compiled and the smallest that did not uses that
slope as its first guess.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from m3ddm_jax.errors import ConfigError, UserError

GIB = 2**30


class DoesNotFitError(UserError):
    """A program needs more device memory than the topology's chips have (one line: topology, need, limit)."""

    def __init__(self, message: str, need_bytes: float | None, limit_bytes: float | None, detail: str = ""):
        super().__init__(message)
        self.need_bytes = need_bytes
        self.limit_bytes = limit_bytes
        self.detail = detail  # the compiler's own message (first line)

    @classmethod
    def of(cls, what: str, batch: int, settings: str, topo: "Topology", need: float | None, limit: float,
           suffix: str = "", detail: str = "") -> "DoesNotFitError":
        """The one line: program, batch and settings, topology and chip, need and limit per device."""
        need_s = f"{need / GIB:.2f} GiB" if need else "more"
        return cls(f"{what} (batch {batch}{', ' + settings if settings else ''}) does not fit on {topo.name} "
                   f"({topo.chip.name}): needs {need_s} per device, limit {limit / GIB:.2f} GiB{suffix}",
                   need, limit, detail)


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float         # usable HBM per device as the TPU compiler reports it (its "available HBM")
    bf16_tflops: float     # peak dense bf16 TFLOP/s per device (public spec sheets)


# Per JAX device (v4 and v5p: one megacore chip = one device). HBM: the compiler's "available HBM" seen in
# its RESOURCE_EXHAUSTED messages (v5e 15.75G, v4 30.75G, v6e 31.25G, v5p 95.74G: the training step at
# batch 512 on v5p:2x2x1).
CHIPS = {
    "v5e": Chip("TPU v5e", 15.75, 197.0),
    "v4": Chip("TPU v4", 30.75, 275.0),
    "v6e": Chip("TPU v6e", 31.25, 918.0),
    "v5p": Chip("TPU v5p", 95.74, 459.0),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


# -- topology --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Topology:
    name: str
    chip: Chip
    devices: list
    hosts: int

    @property
    def n(self) -> int:
        return len(self.devices)

    @property
    def devices_per_host(self) -> int:
        return self.n // self.hosts


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    m = re.fullmatch(r"\s*([a-z0-9]+)\s*:\s*(\d+(?:x\d+){1,2})\s*", str(name))
    if not m:
        raise ConfigError(f"--topology {name!r}: expected GENERATION:DIMS such as v5e:2x4, v4:2x2x1, v5e:16x16")
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise ConfigError(f"--topology {name!r}: unknown TPU generation {m.group(1)!r} (known: {', '.join(CHIPS)})")
    return gen, tuple(int(d) for d in m.group(2).split("x"))


def get_topology(name: str, num_slices: int = 1) -> Topology:
    """Compile-only devices of a TPU slice. Single-host slices (up to 8 chips of v5e/v6e, up to 4 of v4/v5p)
    are one host; larger ones use the generation's default host shape (2x2x1 chips per host)."""
    if not libtpu_available():
        raise UserError("the TPU compiler is not installed: pip install -e '.[tpu-aot]' (libtpu)")
    import os  # noqa: PLC0415

    gen, dims = parse_topology(name)
    chips = math.prod(dims)
    # compile-only use touches no TPU: several processes may load libtpu at once (else its lockfile refuses).
    # Off a TPU VM libtpu looks for the VM's accelerator type and worker hostnames (metadata server, then these
    # variables) and prints five lines of warnings to stderr when it finds neither; naming them silences it and
    # changes nothing in what it compiles (the topology is given explicitly).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    cores = chips * (2 if gen in ("v4", "v5p") else 1)  # v4/v5p slice names count TensorCores
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{'v5litepod' if gen == 'v5e' else gen}-{cores}")
    from jax.experimental import topologies  # noqa: PLC0415

    global _LIBTPU_LOADED
    _LIBTPU_LOADED = True
    kw: dict[str, Any] = {}
    if gen in ("v5e", "v6e") and chips <= 8:
        kw["chips_per_host_bounds"] = tuple(dims) + (1,) * (3 - len(dims))
    if gen == "v4":
        kw["chip_config_name"] = "megacore"
    if num_slices > 1:
        kw["num_slices"] = int(num_slices)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{'x'.join(map(str, dims))}", **kw)
    except Exception as e:  # noqa: BLE001 - the PJRT plugin reports bad topologies as runtime errors
        raise ConfigError(f"--topology {name!r}: {str(e).splitlines()[0]}") from None
    devices = list(topo.devices)
    hosts = len({d.process_index for d in devices})
    return Topology(name=name, chip=CHIPS[gen], devices=devices, hosts=hosts)


# -- memory probes ---------------------------------------------------------------------------------------

_LIBTPU_LOADED = False
PROBE_HBM_MIB = 1


def enable_memory_probe() -> None:
    """Make every TPU compile of this process a memory probe (call before the first :func:`get_topology`).

    The compiler is told each chip has ``PROBE_HBM_MIB`` of HBM (libtpu's ``--xla_tpu_max_hbm_size_mib``), so
    every program fails at memory assignment, after the HLO passes (fusion, sharding, scheduling, the
    compiler's own rematerialisation) and before code generation, which is most of a large compile (about
    4/5 of the full model's train step), with a message stating the bytes the program needs per device.
    That need is not a real compile's, in either direction: the full train step at batch 144 on v5e-8 probed
    15.43 GiB and needs 17.41 (it does not fit the 15.75 GiB), at batch 408 on v5p-8 it probed 93.62 GiB and
    peaks at 90.79. A probe search therefore gives a starting point, not the answer, and
    :func:`max_batch_from` finds the answer with real compiles from there. FLOPs are
    not measured.
    """
    import os  # noqa: PLC0415

    if _LIBTPU_LOADED:
        raise RuntimeError("enable_memory_probe() must run before libtpu is loaded (the first get_topology)")
    flag = f"--xla_tpu_max_hbm_size_mib={PROBE_HBM_MIB}"
    os.environ["LIBTPU_INIT_ARGS"] = f"{os.environ.get('LIBTPU_INIT_ARGS', '')} {flag}".strip()


class MemoryProbe:
    """A program (:class:`TrainProgram` / :class:`InferProgram`) measured by memory probes
    (:func:`enable_memory_probe`): ``compile(batch)`` returns a probe :class:`CompileResult` holding the need,
    or raises :class:`DoesNotFitError` when that need exceeds the chip's limit. :func:`max_batch`
    takes it as it is (and then finds where real compiles should start: :func:`max_batch_from`)."""

    def __init__(self, program):
        self.program, self.what, self.topo = program, program.what, program.topo
        self.divisor = program.divisor
        self.settings = program.settings

    def compile(self, batch: int) -> CompileResult:
        t0 = time.perf_counter()
        try:
            r = self.program.compile(batch)
            need = r.peak_bytes  # under the probe limit: tiny, but real
        except DoesNotFitError as e:
            if e.need_bytes is None:
                raise
            need = e.need_bytes
        dt = time.perf_counter() - t0
        chip, limit = self.topo.chip, self.topo.chip.hbm_gib * GIB
        if need > limit:
            raise DoesNotFitError.of(self.what, batch, self.settings, self.topo, need, limit, " (memory probe)")
        return CompileResult(topology=self.topo.name, what=self.what, batch=batch, devices=self.topo.n,
                             argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=int(need), flops=0.0,
                             compile_s=dt, limit_bytes=limit, peak_tflops=chip.bf16_tflops, settings=self.settings,
                             probe=True)


# -- results ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CompileResult:
    topology: str
    what: str
    batch: int
    devices: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float            # per device, from XLA's cost analysis of the compiled program
    compile_s: float
    limit_bytes: float
    peak_tflops: float
    settings: str = ""
    probe: bool = False     # a memory probe: only the need is known (in temp_bytes), no code was generated

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def step_lower_bound_s(self) -> float:
        return self.flops / (self.peak_tflops * 1e12)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(peak_bytes=self.peak_bytes, step_lower_bound_s=self.step_lower_bound_s)
        return d

    def summary(self) -> str:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        if self.probe:
            return (f"{self.what} on {self.topology} ({self.devices} devices), batch {self.batch}"
                    f"{' [' + self.settings + ']' if self.settings else ''}: needs {g(self.peak_bytes)} per device "
                    f"of {g(self.limit_bytes)} (memory probe: no code generated); probed in {self.compile_s:.1f} s")
        return (f"{self.what} on {self.topology} ({self.devices} devices), batch {self.batch}"
                f"{' [' + self.settings + ']' if self.settings else ''}: per device arguments "
                f"{g(self.argument_bytes)}, outputs {g(self.output_bytes)} (aliased {g(self.alias_bytes)}), "
                f"temporaries {g(self.temp_bytes)}, peak {g(self.peak_bytes)} of {g(self.limit_bytes)}; "
                f"{self.flops / 1e12:.2f} TFLOP per device -> >= {self.step_lower_bound_s * 1e3:.0f} ms at "
                f"{self.peak_tflops:.0f} TFLOP/s; compiled in {self.compile_s:.1f} s")


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"


def _bytes(num: str, unit: str) -> float:
    return float(num) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]


def parse_oom(message: str) -> tuple[float | None, float | None]:
    """``(need, limit)`` bytes from the TPU compiler's out-of-memory message (``None`` where not stated)."""
    m = re.search(r"required for [^(]*\(" + _SIZE + r"\)\s*exceeds available HBM \(" + _SIZE + r"\)", message)
    if m:
        return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
    m = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", message)
    if m:
        return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
    return None, None


def is_oom(message: str) -> bool:
    return "RESOURCE_EXHAUSTED" in message or "Ran out of memory" in message or "exceeds available HBM" in message


def compile_lowered(lower: Callable[[], Any], topo: Topology, what: str, batch: int, settings: str = "") -> CompileResult:
    """Lower and compile; a program that does not fit raises :class:`DoesNotFitError` (one line)."""
    t0 = time.perf_counter()
    lowered = lower()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA reports OOM as a runtime error
        msg = str(e)
        if not is_oom(msg):
            raise
        need, limit = parse_oom(msg)
        limit = limit or topo.chip.hbm_gib * GIB
        detail = next((ln for ln in msg.splitlines() if is_oom(ln)), msg.splitlines()[0] if msg else "")
        raise DoesNotFitError.of(what, batch, settings, topo, need, limit, detail=detail) from None
    dt = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return CompileResult(topology=topo.name, what=what, batch=batch, devices=topo.n,
                         argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                         alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                         flops=float((cost or {}).get("flops", 0.0)), compile_s=dt,
                         limit_bytes=topo.chip.hbm_gib * GIB, peak_tflops=topo.chip.bf16_tflops, settings=settings)


# -- config ----------------------------------------------------------------------------------------------

def load_config(path: str | None, overrides: Sequence[str] = ()):
    """An ml_collections config from ``configs/*.py`` (``get_config()``) with ``--config.a.b=value`` overrides."""
    if path is None:
        root = Path(__file__).resolve().parents[1] / "configs" / "m3ddm_plus.py"
        path = str(root)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    if str(p.resolve().parents[1]) not in sys.path:
        sys.path.insert(0, str(p.resolve().parents[1]))  # configs import each other as `configs.x`
    spec = importlib.util.spec_from_file_location(f"_aot_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        config = mod.get_config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--config {path}: cannot load ({type(e).__name__}: {e})") from None
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config, item: str) -> None:
    """``config.a.b=value`` (the ``--config.`` prefix stripped or not), typed like the current value."""
    key, sep, raw = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected --config.a.b=value")
    *parents, leaf = key.split(".")
    node = config
    for k in parents:
        if k not in node:
            raise ConfigError(f"override {item!r}: the config has no field {key!r}")
        node = node[k]
    if leaf not in node:
        raise ConfigError(f"override {item!r}: the config has no field {key!r}")
    cur = node[leaf]
    try:
        if isinstance(cur, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            val = raw.lower() in ("true", "1")
        elif isinstance(cur, int):
            val = int(raw)
        elif isinstance(cur, float):
            val = float(raw)
        elif isinstance(cur, (tuple, list)):
            val = type(cur)(ast.literal_eval(raw))
        else:
            val = raw
    except (ValueError, SyntaxError):
        raise ConfigError(f"override {item!r}: {raw!r} is not a {type(cur).__name__}") from None
    node[leaf] = val


def unet_config_of(config):
    """The U-Net's structure: ``model.unet_config`` (a config.json or U-Net folder) if set, a local init folder's
    config.json, else the released model (``m3ddm`` / ``m3ddm+`` / hub ids share its structure)."""
    from m3ddm_jax.models.unet3d import UNet3DConfig  # noqa: PLC0415

    for src in (str(config.model.get("unet_config", "") or ""), str(config.model.get("init", "") or "")):
        if not src:
            continue
        p = Path(src).expanduser()
        if p.is_dir() and (p / "config.json").is_file():
            return UNet3DConfig.from_json_file(p / "config.json")
        if p.is_file():
            return UNet3DConfig.from_json_file(p)
    return UNet3DConfig()


def vae_config_of(config):
    from m3ddm_jax.models.vae import VAEConfig  # noqa: PLC0415

    p = Path(str(config.model.get("vae", "") or "")).expanduser()
    for cand in (p / "vae" / "config.json", p / "config.json"):
        if cand.is_file():
            import json  # noqa: PLC0415

            return VAEConfig.from_dict(json.loads(cand.read_text()))
    return VAEConfig.sd15()


# -- programs --------------------------------------------------------------------------------------------

def _sds(tree, shardings):
    import jax  # noqa: PLC0415

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class TrainProgram:
    """The trainer's jitted train step over a topology, for any global batch."""

    what = "train"

    def __init__(self, config, topo: Topology):
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415
        from flax import nnx  # noqa: PLC0415

        from m3ddm_jax.interop.unet import abstract_unet  # noqa: PLC0415
        from m3ddm_jax.models.vae import vae_from_config  # noqa: PLC0415
        from m3ddm_jax.train import sharding as S  # noqa: PLC0415
        from m3ddm_jax.train import trainer as T  # noqa: PLC0415
        from m3ddm_jax.train.step import StepFns, init_state, state_shardings  # noqa: PLC0415

        self.config, self.topo = config, topo
        self.mesh = S.make_mesh(dict(config.mesh.shape), tuple(config.mesh.axes), devices=topo.devices)
        self.sh = S.Shardings(self.mesh, [tuple(r) for r in config.sharding.rules],
                              int(config.sharding.min_shard_elements))
        self.divisor = self.sh.batch_size_divisor
        self.spec = T.clip_spec(config)
        self.spec.validate()
        ucfg, vcfg = unet_config_of(config), vae_config_of(config)
        m = config.model
        vae = nnx.eval_shape(lambda: vae_from_config(vcfg, 0, dtype=T._dtype(m.vae_compute_dtype) or jnp.float32))
        self.vae_gd, vae_state = nnx.split(vae)
        unet = abstract_unet(ucfg, **T.unet_options(config))
        unet_gd, abs_params, abs_stats = nnx.split(unet, nnx.Param, nnx.BatchStat)
        params, stats = nnx.to_pure_dict(abs_params), nnx.to_pure_dict(abs_stats)
        step_cfg = dataclasses.replace(T.step_config(config), latent_factor=int(vcfg.downscale))
        tx, schedule = T.optimizer(config)
        self.fns = StepFns(unet_gd, self.vae_gd, tx, schedule, step_cfg)
        ema = step_cfg.ema_decay > 0
        shapes = jax.eval_shape(lambda p, s: init_state(p, s, tx, seed=0, ema=ema), params, stats)
        self.state_sh = state_shardings(shapes, self.sh)
        self.state = {k: (None if v is None else _sds(v, self.state_sh[k])) for k, v in shapes.items()}
        self.vae_sh = self.sh.replicated_tree(vae_state)
        self.vae_state = _sds(vae_state, self.vae_sh)
        self.jitted = jax.jit(self.fns.train_step,
                              in_shardings=(self.state_sh, self.vae_sh, None, self.sh.replicated),
                              out_shardings=(self.state_sh, self.sh.replicated), donate_argnums=(0,))
        self.settings = (f"{m.compute_dtype} compute, fp32 Adam, remat {'on' if m.remat else 'off'}, attention "
                         f"{m.attention_impl}, mesh {dict(self.mesh.shape)}, {self.spec.num_frames}+"
                         f"{self.spec.num_global_frames} frames at {self.spec.size}/{self.spec.global_size} px")

    def batch_shapes(self, batch: int) -> dict:
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        s = self.spec
        shapes = {"frames": ((batch, s.num_frames, s.size, s.size, 3), jnp.uint8),
                  "global_frames": ((batch, s.num_global_frames, s.global_size, s.global_size, 3), jnp.uint8),
                  "fps": ((batch,), jnp.float32)}
        return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.sh.for_batch(jax.ShapeDtypeStruct(shape, dt)))
                for k, (shape, dt) in shapes.items()}

    def check_batch(self, batch: int) -> None:
        if batch < 1 or batch % self.divisor:
            raise ConfigError(f"batch {batch} must be a positive multiple of the batch mesh size {self.divisor} "
                              f"(mesh {dict(self.mesh.shape)})")

    def compile(self, batch: int) -> CompileResult:
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        self.check_batch(batch)
        draw = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.sh.replicated)
        return compile_lowered(lambda: self.jitted.lower(self.state, self.vae_state, self.batch_shapes(batch), draw),
                               self.topo, self.what, batch, self.settings)


class InferProgram:
    """One outpainting window's whole denoising loop (the sampler's jitted function) over a topology."""

    what = "infer"
    divisor = 1

    def __init__(self, topo: Topology, unet_config=None, *, dtype: str = "bfloat16", rows: int = 3,
                 frames: int = 16, size: int = 256, global_frames: int = 16, global_size: int = 256,
                 steps: int = 50, sampler: str = "plms", attention_impl: str = "xla",
                 attention_budget_mib: float | str | None = "auto", guidance=None):
        import jax.numpy as jnp  # noqa: PLC0415
        from flax import nnx  # noqa: PLC0415

        from m3ddm_jax.diffusion import make_sampler  # noqa: PLC0415
        from m3ddm_jax.interop.unet import abstract_unet  # noqa: PLC0415
        from m3ddm_jax.models.unet3d import UNet3DConfig  # noqa: PLC0415
        from m3ddm_jax.outpaint import sampler as SM  # noqa: PLC0415
        from m3ddm_jax.train import sharding as S  # noqa: PLC0415
        from m3ddm_jax.train.trainer import _dtype  # noqa: PLC0415

        if rows not in (3, 4):
            raise ConfigError(f"--rows {rows}: 3 (uu, cu, cc) or 4 (uu, cu, uc, cc)")
        if size % 64 or global_size % 8:
            raise ConfigError(f"--size {size} must be a multiple of 64 (canvas) and --global-size of 8")
        self.topo = topo
        dt = _dtype(dtype) or jnp.float32
        ucfg = unet_config or UNet3DConfig()
        unet = abstract_unet(ucfg, dtype=dt, param_dtype=dt, attention_impl=attention_impl,
                             attention_budget_mib=attention_budget_mib)
        gd, state = nnx.split(unet)
        self.mesh = S.make_mesh({"fsdp": topo.n}, ("fsdp",), devices=topo.devices)
        sh = S.Shardings(self.mesh, [("batch", ()), ("shard", ("fsdp",))])
        state_sh = sh.params_tree(state)
        self.state = _sds(state, state_sh)
        guidance = guidance or SM.Guidance()
        if guidance.mode != "two_factor" and rows == 3:
            raise ConfigError("--rows 3 is two-factor guidance (both scales > 1)")
        guidance = dataclasses.replace(guidance, rows=rows)
        spec = make_sampler(sampler, steps)
        fn = SM.Denoiser(gd, spec, guidance, report=False)._denoise  # the sampler's own program
        self._shape = (frames, size // 8, global_frames, global_size // 8)
        self._sh, self._fn, self._state_sh = sh, fn, state_sh
        self.jitted = {}
        budget = ("" if attention_impl != "xla" else " unchunked" if attention_budget_mib is None
                  else f" chunked ({attention_budget_mib} score budget)" if attention_budget_mib == "auto"
                  else f" chunked ({attention_budget_mib:g} MiB score budget)")
        self.settings = (f"{rows} guidance rows, {frames} frames at {size} px, {global_frames} global frames, "
                         f"{dtype} params+compute, attention {attention_impl}{budget}, {steps} {sampler} steps")

    def lowering_args(self, batch: int = 1):
        """Abstract arguments of one denoiser call over ``batch`` windows (the sampler's window axis): sharded
        over the chips when ``batch`` divides over them, else replicated (the parameters are FSDP-sharded)."""
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415
        from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

        if batch < 1:
            raise ConfigError(f"batch {batch}: the number of windows per call must be positive")
        frames, h, gf, gh = self._shape
        mesh = self._sh.mesh
        win = NamedSharding(mesh, P("fsdp")) if batch % mesh.size == 0 else self._sh.replicated
        f32 = jnp.float32
        sds = lambda *shape: jax.ShapeDtypeStruct((batch,) + shape, f32, sharding=win)  # noqa: E731
        args = (self.state, sds(frames, h, h, 4), sds(frames, h, h, 4), sds(frames, h, h, 4), sds(frames, h, h, 1),
                sds(frames, h, h, 1), sds(gf, gh, gh, 4), sds())
        if win not in self.jitted:
            self.jitted[win] = jax.jit(self._fn, in_shardings=(self._state_sh,) + (win,) * 7, out_shardings=win,
                                       donate_argnums=(1,))
        return self.jitted[win], args

    def compile(self, batch: int = 1) -> CompileResult:
        """Compile one denoiser call over ``batch`` windows (a wave; 1: one window, the sequential schedule)."""
        jitted, args = self.lowering_args(batch)
        settings = self.settings + (f", {batch} windows per call" if batch != 1 else "")
        return compile_lowered(lambda: jitted.lower(*args), self.topo, self.what, batch, settings)


# -- max batch -------------------------------------------------------------------------------------------

def max_batch(program, *, limit_steps: int = 4096, log: Callable[[str], None] = print
              ) -> tuple[int, CompileResult | None, list]:
    """Largest global batch (multiple of ``program.divisor``) whose program compiles.

    Returns ``(batch, its CompileResult, [(batch, ok, peak or need bytes)])``; batch 0 when even the smallest
    does not fit. Probes: k = 1, 2 (memory slope per k), the slope's prediction, the batch after it (where
    memory is linear in the batch: done in four probes), then doubling until one fails and bisection between
    the largest k that compiled and the smallest that did not, each probe the slope's prediction when it lies
    strictly inside.
    """
    d = program.divisor
    tried: list = []
    best: tuple[int, CompileResult] | None = None
    lo, hi = 0, None  # lo: largest k known to fit; hi: smallest k known not to fit
    peaks: dict[int, float] = {}
    limit = None

    def probe(k: int) -> bool:
        nonlocal best, lo, hi, limit
        try:
            r = program.compile(k * d)
        except DoesNotFitError as e:
            tried.append((k * d, False, e.need_bytes))
            log(f"  batch {k * d}: does not fit ({e})")
            hi = k if hi is None else min(hi, k)
            if e.limit_bytes:
                limit = e.limit_bytes
            return False
        tried.append((k * d, True, r.peak_bytes))
        log(f"  batch {k * d}: {r.peak_bytes / GIB:.2f} GiB peak, compiled in {r.compile_s:.1f} s")
        peaks[k] = r.peak_bytes
        limit = limit or r.limit_bytes
        if k > lo:
            lo, best = k, (k, r)
        return True

    stepped = False  # the next batch after a confirmed guess was tried
    if not probe(1):
        return 0, None, tried
    probe(2)
    while hi is None or hi - lo > 1:
        guess = None
        if len(peaks) >= 2:  # the memory slope per batch step, from the smallest and largest fitting probes
            k1, k2 = min(peaks), max(peaks)
            slope = (peaks[k2] - peaks[k1]) / (k2 - k1)
            if slope > 0:
                guess = k1 + int((limit - peaks[k1]) // slope)
        if hi is None:  # no failure yet: the guess if it goes up, else the next batch once, then doubling
            if guess is not None and guess > lo:
                k = guess
            elif not stepped:
                k, stepped = lo + 1, True
            else:
                k = 2 * lo
            if k > limit_steps:
                break
        else:  # bisection, probing the guess first when it lies strictly inside
            k = guess if guess is not None and lo < guess < hi else (lo + hi) // 2
        probe(k)
    return best[0] * d, best[1], tried


def max_batch_from(program, start: int, *, log: Callable[[str], None] = print
                   ) -> tuple[int, CompileResult | None, list]:
    """Largest global batch whose program compiles, by real compiles from ``start``, such as a memory-probe
    search's result. A probe's need is not a bound either way: on v5e-8 at batch 144 the probe needed 15.43
    GiB and the real compile 17.41 (does not fit), on v5p-8 at batch 408 the probe needed 93.62 GiB and the
    real compile peaked at 90.79 (fits).

    A real compile that does not fit fails at memory assignment, before code generation, and states its
    need, so the failures are cheap and the successes are full compiles. While the batch does not fit, each
    step goes down by the need over the limit divided by the memory slope per batch step: need / k after the
    first failure (an overestimate of the slope when memory has a fixed part, so the step does not pass the
    answer), then the secant of the two smallest failures. From the first batch that compiles the search
    goes up one step at a time until one does not, so the answer is bracketed. Returns what
    :func:`max_batch` returns."""
    d = program.divisor
    tried: list = []
    fails: dict[int, float] = {}  # k -> need (inf: not stated)
    limit = None  # the compiler's stated limit

    def attempt(k: int) -> CompileResult | None:
        nonlocal limit
        try:
            r = program.compile(k * d)
        except DoesNotFitError as e:
            tried.append((k * d, False, e.need_bytes))
            log(f"  batch {k * d}: does not fit ({e})")
            fails[k] = e.need_bytes if e.need_bytes and e.limit_bytes else math.inf
            limit = e.limit_bytes or limit
            return None
        tried.append((k * d, True, r.peak_bytes))
        log(f"  batch {k * d}: {r.peak_bytes / GIB:.2f} GiB peak, compiled in {r.compile_s:.1f} s")
        return r

    k = max(1, start // d)
    while k >= 1 and (r := attempt(k)) is None:
        known = sorted((a, b) for a, b in fails.items() if math.isfinite(b))
        if not math.isfinite(fails[k]):
            k -= 1
            continue
        if len(known) > 1:  # the two smallest failing batches: the nearest to the answer
            (k1, n1), (k2, n2) = known[:2]
            slope = (n2 - n1) / (k2 - k1)
        else:
            slope = fails[k] / k
        k -= max(1, math.ceil((fails[k] - limit) / slope) if slope > 0 else 1)
        if k < 1 and 1 not in fails:  # the smallest batch is always tried before giving up
            k = 1
    if k < 1:
        return 0, None, tried
    best = (k, r)
    k += 1
    while k not in fails and (r := attempt(k)) is not None:
        best, k = (k, r), k + 1
    return best[0] * d, best[1], tried


# -- CLI -------------------------------------------------------------------------------------------------

def _parser():
    from m3ddm_jax.cli_common import OneLineParser  # noqa: PLC0415

    p = OneLineParser(prog="python -m m3ddm_jax.aot",
                      description="Compile the train step or an inference window for a TPU topology (no TPU "
                                  "needed) and print per-device memory, FLOPs and compile time. Config "
                                  "overrides: --config.a.b=value.")
    p.add_argument("--topology", required=True, help="e.g. v5e:2x4 (v5e-8), v5e:1x1, v4:2x2x1, v6e:2x4, v5p:2x2x1, v5e:16x16")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: number of slices")
    p.add_argument("--what", choices=("train", "infer"), required=True)
    p.add_argument("--config", default=None, help="ml_collections config (train; default configs/m3ddm_plus.py); "
                   "infer reads only model.unet_config / model.init from it")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--batch", type=int, default=None, help="train: global batch (default: the config's); infer: windows per denoiser call (default 1)")
    g.add_argument("--max-batch", action="store_true", help="find the largest global batch that compiles")
    p.add_argument("--start", type=int, default=None,
                   help="with --max-batch: search by real compiles from this batch (e.g. a --memory-probe search's "
                        "result), down while it does not fit (failures stop before code generation), then up until "
                        "one does not")
    p.add_argument("--dtype", default="bfloat16", help="infer: parameter and compute dtype")
    p.add_argument("--rows", type=int, default=3, help="infer: guidance rows, 3 (uu, cu, cc) or 4")
    p.add_argument("--frames", type=int, default=16, help="infer: window frames")
    p.add_argument("--size", type=int, default=256, help="infer: canvas pixels (latents size/8)")
    p.add_argument("--global-frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="infer: sampler steps")
    p.add_argument("--attention", default="xla", help="infer: attention implementation (train: model.attention_impl)")
    p.add_argument("--attention-budget-mib", default="auto", help="infer: xla score budget per chunk, 'auto' or 'none'")
    p.add_argument("--memory-probe", action="store_true",
                   help="measure only the memory each program needs, stopping the compiler before code generation "
                        "(minutes instead of tens of minutes for the full model; no FLOPs); with --max-batch the "
                        "search runs on probes")
    p.add_argument("--json", default=None, help="also write the result(s) as JSON to this file")
    return p


def build_program(args, overrides: Sequence[str]):
    topo = get_topology(args.topology, args.num_slices)
    if args.what == "train":
        config = load_config(args.config, overrides)
        return TrainProgram(config, topo), config
    config = load_config(args.config, overrides) if (args.config or overrides) else None
    budget = args.attention_budget_mib
    budget = None if str(budget).lower() == "none" else (budget if budget == "auto" else float(budget))
    return InferProgram(topo, unet_config_of(config) if config is not None else None, dtype=args.dtype,
                        rows=args.rows, frames=args.frames, size=args.size, global_frames=args.global_frames,
                        global_size=args.size, steps=args.steps, attention_impl=args.attention,
                        attention_budget_mib=budget), config


def main(argv: Sequence[str] | None = None) -> int:
    import os  # noqa: PLC0415

    from m3ddm_jax.cli_common import run_main  # noqa: PLC0415

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    args = _parser().parse_args(rest)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host side of an AOT compile needs no accelerator

    def run() -> int:
        import json  # noqa: PLC0415

        if args.start is not None and (not args.max_batch or args.memory_probe or args.start < 1):
            raise ConfigError("--start N (N >= 1) goes with --max-batch and without --memory-probe")
        if args.memory_probe:
            enable_memory_probe()
        program, config = build_program(args, overrides)
        if args.memory_probe:
            program = MemoryProbe(program)
        print(f"{program.what} on {args.topology}: {program.topo.n} devices ({program.topo.chip.name}), "
              f"{program.topo.hosts} host(s); {program.settings}", flush=True)
        if args.max_batch:
            search = max_batch if args.start is None else functools.partial(max_batch_from, start=args.start)
            batch, res, tried = search(program, log=lambda s: print(s, flush=True))
            if res is None:
                n, lim = min(tried)[2], program.topo.chip.hbm_gib * GIB
                raise DoesNotFitError(f"{program.what} does not fit on {args.topology} ({program.topo.chip.name}) even at "
                                      f"batch {program.divisor}: needs {n / GIB:.2f} GiB per device, limit "
                                      f"{lim / GIB:.2f} GiB" if n else f"{program.what} does not fit on {args.topology}",
                                      n, lim)
            print(f"max batch {batch}: {res.summary()}")
            out = dict(res.as_dict(), max_batch=batch, tried=tried)
        else:
            batch = args.batch or (1 if program.what == "infer" else int(config.train.batch_size))
            res = program.compile(batch)
            print(res.summary())
            out = res.as_dict()
        out["hosts"] = program.topo.hosts
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return 0

    return run_main("m3ddm_jax.aot", run)


if __name__ == "__main__":
    sys.exit(main())
