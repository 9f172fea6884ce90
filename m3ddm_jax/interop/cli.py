"""``python -m convert SRC DST``: PyTorch <-> Flax conversion of the M3DDM U-Net and the SD VAE.

The direction follows SRC: a PyTorch/diffusers folder (``config.json`` + ``diffusion_pytorch_model``
``.safetensors`` or ``.bin``, fp16 or fp32) becomes a converted Flax folder (``config.json`` +
``flax_model.safetensors``); a converted Flax folder becomes a folder in the released PyTorch layout (same
keys, shapes and dtype) that ``from_pretrained`` loads. Which model it is comes from the config
(``_class_name`` UNet3DConditionModel / AutoencoderKL, or the Flax tag). A pipeline folder holding
``unet/`` and/or ``vae/`` converts each into the same subfolder of DST.

Every key is accounted for: a missing, unexpected or mis-shaped tensor stops the conversion with its name.
DST is written to a temporary folder and renamed, so a failed conversion leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
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


def convert_folder(src: Path, dst: Path, fmt: str = "safetensors", dtype: str = "keep") -> tuple[str, str]:
    """Convert one model folder; returns ``(kind, direction)``."""
    kind = model_kind(src)
    to_flax = not is_flax_folder(src)
    dt = _np_dtype(dtype)
    if kind == "unet":
        from m3ddm_jax.interop.unet import export_unet_torch, load_unet_flat, save_unet_flax  # noqa: PLC0415

        if to_flax:
            cfg, flat = load_unet_flat(src)
            save_unet_flax(flat, dst, config=cfg, dtype=dt)
        else:
            _atomic_dir(dst, lambda tmp: export_unet_torch(src, tmp, fmt=fmt, dtype=dt))
    else:
        from m3ddm_jax.interop.vae import export_vae_torch, load_vae, save_vae_flax  # noqa: PLC0415

        if to_flax:
            model = load_vae(src, dtype=None) if dt is None else load_vae(src, dtype=dt)
            save_vae_flax(model, None, dst)
        else:
            _atomic_dir(dst, lambda tmp: export_vae_torch(src, tmp, fmt=fmt, dtype=dt))
    return kind, ("PyTorch -> Flax" if to_flax else "Flax -> PyTorch")


def _atomic_dir(dst: Path, write) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="PyTorch model folder, converted Flax folder, or a folder with unet/ and vae/")
    p.add_argument("dst", help="output folder (created; replaced if it exists)")
    p.add_argument("--format", choices=("safetensors", "bin"), default="safetensors",
                   help="PyTorch weight file written for Flax -> PyTorch (default safetensors)")
    p.add_argument("--dtype", choices=DTYPES, default="keep", help="cast float weights (default: keep the stored dtype)")
    args = p.parse_args(argv)

    def run() -> int:
        src, dst = Path(args.src), Path(args.dst)
        if not src.is_dir():
            raise UserError(f"source folder not found: {src}")
        if dst.resolve() == src.resolve():
            raise UserError("destination equals source")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {dst.parent}: {e.strerror or e}") from e
        if (src / "config.json").is_file():
            jobs = [(src, dst)]
        else:
            jobs = [(src / sub, dst / sub) for sub in ("unet", "vae") if (src / sub / "config.json").is_file()]
            if not jobs:
                raise UserError(f"{src} holds no config.json and no unet/ or vae/ model folder")
        for s, d in jobs:
            kind, direction = convert_folder(s, d, args.format, args.dtype)
            print(f"{s} -> {d}: {kind}, {direction}")
        return 0

    return run_main("convert", run)


if __name__ == "__main__":
    sys.exit(main())
