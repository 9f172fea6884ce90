"""``python -m convert SRC DST``: PyTorch <-> Flax conversion of the M3DDM U-Net and the SD VAE.

The direction follows SRC: a PyTorch/diffusers folder (``config.json`` + ``diffusion_pytorch_model``
``.safetensors`` or ``.bin``, fp16 or fp32) becomes a converted Flax folder (``config.json`` +
``flax_model.safetensors``); a converted Flax folder becomes a folder in the released PyTorch layout (same
keys, shapes and dtype) that ``from_pretrained`` loads. Which model it is comes from the config
(``_class_name`` UNet3DConditionModel / AutoencoderKL, or the Flax tag). A pipeline folder holding
``unet/`` and/or ``vae/`` converts each into the same subfolder of DST.

Every key is accounted for: a missing, unexpected or mis-shaped tensor stops the conversion with its name.
DST must be new or empty; ``--overwrite`` writes into a non-empty DST, replacing only the files of the same
names (``config.json`` and the weights file of each model) and keeping everything else. The conversion is
written to a temporary dot-folder (``.DST.partial-<pid>-<random>``, or inside DST when it exists) and
moved into place only when complete: a failure, a full disk included, leaves no partial file and DST as it
was (a killed run's dot-folder is removed by the next run).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from m3ddm_jax.cli_common import OneLineParser, run_main
from m3ddm_jax.errors import CheckpointError, UserError
from m3ddm_jax.interop.flax_io import is_flax_folder, read_config

DTYPES = ("keep", "float32", "float16", "bfloat16")


def model_kind(folder: Path) -> str:
    """``"unet"`` or ``"vae"`` from a model folder's config."""
    cfg = read_config(folder)
    tag = cfg.get("_m3ddm_jax") or {}
    if tag.get("kind") in ("unet", "vae"):
        return tag["kind"]
    name = cfg.get("_class_name", "")
    if name == "AutoencoderKL" or "latent_channels" in cfg:
        return "vae"
    if name in ("UNet3DConditionModel",) or any("3D" in str(b) for b in cfg.get("down_block_types", [])):
        return "unet"
    raise CheckpointError(f"{folder / 'config.json'}: neither an M3DDM U-Net nor an AutoencoderKL config "
                          f"(_class_name {name!r})")


def _np_dtype(name: str):
    if name == "keep":
        return None
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return ml_dtypes.bfloat16
    import numpy as np  # noqa: PLC0415

    return np.dtype(name)


def _write_model(src: Path, out: Path, fmt: str, dtype: str) -> tuple[str, str, list[str]]:
    """Convert one model folder into ``out`` (a new folder); returns ``(kind, direction, files written)``."""
    kind = model_kind(src)
    to_flax = not is_flax_folder(src)
    dt = _np_dtype(dtype)
    if kind == "unet":
        from m3ddm_jax.interop.unet import export_unet_torch, load_unet_flat, save_unet_flax  # noqa: PLC0415

        if to_flax:
            cfg, flat = load_unet_flat(src)
            save_unet_flax(flat, out, config=cfg, dtype=dt)
        else:
            export_unet_torch(src, out, fmt=fmt, dtype=dt)
    else:
        from m3ddm_jax.interop.vae import export_vae_torch, load_vae, save_vae_flax  # noqa: PLC0415

        if to_flax:
            model = load_vae(src, dtype=None) if dt is None else load_vae(src, dtype=dt)
            save_vae_flax(model, None, out)
        else:
            export_vae_torch(src, out, fmt=fmt, dtype=dt)
    return kind, ("PyTorch -> Flax" if to_flax else "Flax -> PyTorch"), sorted(f.name for f in out.iterdir())


def _install(built: Path, dst: Path) -> None:
    """Move the finished tree ``built`` to ``dst``: one rename when ``dst`` is new, else file by file (each
    replacing only its namesake, ``config.json`` files last); nothing else in ``dst`` is touched."""
    from m3ddm_jax.atomic import default_mode, fsync_path, replace  # noqa: PLC0415

    files = sorted((f for f in built.rglob("*") if f.is_file()), key=lambda f: (f.name == "config.json", str(f)))
    for f in files:
        default_mode(f)
        fsync_path(f)
    for d in [built, *(d for d in built.rglob("*") if d.is_dir())]:
        default_mode(d)
    if not dst.exists() and not dst.is_symlink():
        os.replace(built, dst)
        return
    for f in files:
        target = dst / f.relative_to(built)
        if target.is_dir():
            raise UserError(f"cannot write {target}: a folder of that name is in the way")
        target.parent.mkdir(parents=True, exist_ok=True)
        replace(f, target)


def _staging(dst: Path) -> Path:
    """A fresh temporary folder on ``dst``'s file system: inside ``dst`` when it exists, else beside it."""
    from m3ddm_jax.atomic import new_dir  # noqa: PLC0415

    return new_dir(dst / "convert" if dst.is_dir() else dst)


def convert_folder(src: Path, dst: Path, fmt: str = "safetensors", dtype: str = "keep") -> tuple[str, str]:
    """Convert one model folder into ``dst`` (created, or its files of the same names replaced; anything else
    in it is kept); returns ``(kind, direction)``. Nothing is left half-written on a failure."""
    from m3ddm_jax.atomic import remove  # noqa: PLC0415

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = _staging(dst)
    try:
        kind, direction, _ = _write_model(src, stage / "out", fmt, dtype)
        _install(stage / "out", dst)
    finally:
        remove(stage)
    return kind, direction


WEIGHT_FILES = ("flax_model.safetensors", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="PyTorch model folder, converted Flax folder, or a folder with unet/ and vae/")
    p.add_argument("dst", help="output folder: new or empty (a non-empty one needs --overwrite)")
    p.add_argument("--format", choices=("safetensors", "bin"), default="safetensors",
                   help="PyTorch weight file written for Flax -> PyTorch (default safetensors)")
    p.add_argument("--dtype", choices=DTYPES, default="keep", help="cast float weights (default: keep the stored dtype)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty DST: replace the files of the same names (config.json and the "
                        "weights file of each model), keep everything else")
    args = p.parse_args(argv)

    def run() -> int:
        from m3ddm_jax.atomic import MARK, WriteError, reason, remove  # noqa: PLC0415

        src, dst = Path(args.src), Path(args.dst)
        if not src.is_dir():
            raise UserError(f"source folder not found: {src}")
        if dst.resolve() == src.resolve():
            raise UserError("destination equals source")
        if dst.exists() and not dst.is_dir():
            raise UserError(f"destination {dst} exists and is not a folder")
        if (src / "config.json").is_file():
            jobs = [(src, "")]
        else:
            jobs = [(src / sub, sub) for sub in ("unet", "vae") if (src / sub / "config.json").is_file()]
            if not jobs:
                raise UserError(f"{src} holds no config.json and no unet/ or vae/ model folder")
        if dst.is_dir() and not args.overwrite:
            present = sorted(f.name for f in dst.iterdir() if MARK not in f.name)
            if present:
                shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
                raise UserError(f"destination {dst} is not empty ({shown}); give a new or empty folder, or "
                                "--overwrite to replace only the files convert writes and keep the rest")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {dst.parent}: {reason(e)}") from e
        stage = _staging(dst)
        try:
            done = []
            for s, sub in jobs:
                out = stage / "out" / sub if sub else stage / "out"
                out.parent.mkdir(parents=True, exist_ok=True)
                kind, direction, written = _write_model(s, out, args.format, args.dtype)
                d = dst / sub if sub else dst
                kept = [w for w in WEIGHT_FILES if w not in written and (d / w).exists()]
                done.append((s, d, kind, direction, kept))
            _install(stage / "out", dst)
        except (OSError, WriteError) as e:  # a full disk, a read-only folder: name DST, not the temporary
            raise UserError(f"cannot write {dst}: {reason(e)}") from e
        finally:
            remove(stage)
        for s, d, kind, direction, kept in done:
            print(f"{s} -> {d}: {kind}, {direction}")
            if kept:
                print(f"convert: note: {d} still holds {', '.join(kept)} from before (not written by this "
                      "conversion; delete it if loaders should not see it)", file=sys.stderr)
        return 0

    return run_main("convert", run)


if __name__ == "__main__":
    sys.exit(main())
