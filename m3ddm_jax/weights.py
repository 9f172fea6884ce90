"""Where weights come from: local folders, the Hugging Face hub, and a cache of converted Flax weights.

``--weights`` (infer.py, eval.py) and :func:`resolve_weights` accept

* a local folder holding ``unet/`` and ``vae/`` (each a converted Flax folder or a PyTorch/diffusers folder);
* a local U-Net folder alone (the VAE then comes from the default VAE source);
* a Hugging Face repo id (``owner/name``) of a U-Net release; files are fetched with ``huggingface_hub``
  (safetensors preferred over ``.bin``), converted to Flax once and cached under
  ``$M3DDM_JAX_CACHE`` (default ``~/.cache/m3ddm_jax``).

Defaults: the M3DDM+ U-Net (:data:`DEFAULT_UNET_REPO`) and the SD-1.5 VAE
(:data:`DEFAULT_VAE_REPO`, subfolder ``vae``). Offline with nothing cached, one clear
:class:`~m3ddm_jax.errors.CheckpointError` says what to download and how to pass it.
"""
from __future__ import annotations

import os
from pathlib import Path

from m3ddm_jax.errors import CheckpointError
from m3ddm_jax.interop.flax_io import is_flax_folder

DEFAULT_UNET_REPO = "MurakawaTakuya/M3DDM-Plus"           # M3DDM+ (fine-tuned with uniform masks)
M3DDM_UNET_REPO = "alimama-creative/M3DDM-Video-Outpainting"  # the original M3DDM release
DEFAULT_VAE_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_VAE_SUBFOLDER = "vae"
KNOWN = {"m3ddm+": DEFAULT_UNET_REPO, "m3ddm-plus": DEFAULT_UNET_REPO, "m3ddm": M3DDM_UNET_REPO}


def cache_dir() -> Path:
    return Path(os.environ.get("M3DDM_JAX_CACHE", Path.home() / ".cache" / "m3ddm_jax"))


def _is_model_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and (
        is_flax_folder(p)
        or (p / "diffusion_pytorch_model.safetensors").is_file()
        or (p / "diffusion_pytorch_model.bin").is_file()
    )


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint (so an offline machine fails fast, without retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import socket  # noqa: PLC0415
    from urllib.parse import urlparse  # noqa: PLC0415

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download(repo_id: str, subfolder: str | None, what: str) -> Path:
    """Fetch config.json + weights (safetensors preferred) of ``repo_id[/subfolder]``; return the folder."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover
        raise CheckpointError("huggingface_hub is needed to download weights (pip install huggingface_hub)") from e
    prefix = f"{subfolder}/" if subfolder else ""
    hint = (f"download {what} on a connected machine (huggingface-cli download {repo_id}"
            f"{' --include ' + repr(prefix + '*') if prefix else ''}) and pass the local folder with --weights")
    try:
        files = None  # offline: use whatever is in the local hub cache
        if _hub_reachable():
            try:
                files = list_repo_files(repo_id)
            except Exception:
                files = None
        names = None
        if files is not None:
            # a repo may keep the U-Net at the root or under unet/
            if not subfolder and not any(f == "config.json" for f in files) and any(f == "unet/config.json" for f in files):
                prefix = "unet/"
            weights = [f for f in files if f.startswith(prefix) and f.count("/") == prefix.count("/")]
            st = [f for f in weights if f.endswith(".safetensors")]
            bins = [f for f in weights if f.endswith(".bin")]
            names = [prefix + "config.json"] + (st[:1] if st else bins[:1])
            if len(names) < 2:
                raise CheckpointError(f"{repo_id} has no weights file under '{prefix or '/'}'")
        folder = snapshot_download(repo_id, allow_patterns=names or [prefix + "config.json", prefix + "*.safetensors", prefix + "*.bin"],
                                   local_files_only=files is None)
    except CheckpointError:
        raise
    except Exception as e:
        reason = "not in the local cache and the hub is unreachable" if not _hub_reachable(1.0) else type(e).__name__
        raise CheckpointError(f"cannot get {what} from the Hugging Face hub ({reason}); {hint}") from e
    path = Path(folder) / prefix if prefix else Path(folder)
    if not _is_model_folder(path):
        raise CheckpointError(f"{repo_id}: no model found after download; {hint}")
    return path


def _cached_flax(src: Path, kind: str, key: str) -> Path:
    """Convert a PyTorch folder to Flax once, keyed by ``key``; return the Flax folder."""
    if is_flax_folder(src):
        return src
    dest = cache_dir() / "flax" / key.replace("/", "--") / kind
    if is_flax_folder(dest):
        return dest
    if kind == "unet":
        from m3ddm_jax.interop.unet import load_unet_flat, save_unet_flax  # noqa: PLC0415

        cfg, flat = load_unet_flat(src)
        save_unet_flax(flat, dest, config=cfg)
    else:
        from m3ddm_jax.interop.vae import load_vae, save_vae_flax  # noqa: PLC0415

        save_vae_flax(load_vae(src, dtype=None), None, dest)
    return dest


def resolve_weights(spec: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                    convert_cache: bool = True) -> tuple[Path, Path]:
    """``(unet_folder, vae_folder)`` for a ``--weights`` value (None: the M3DDM+ release)."""
    spec = str(spec) if spec is not None else DEFAULT_UNET_REPO
    spec = KNOWN.get(spec.lower(), spec)
    p = Path(spec).expanduser()
    vae_folder: Path | None = None
    if p.exists():
        if (p / "unet").is_dir():
            unet_folder = p / "unet"
            if (p / "vae").is_dir():
                vae_folder = p / "vae"
        elif _is_model_folder(p):
            unet_folder = p
        else:
            raise CheckpointError(f"{p} holds no unet/ folder and no model (config.json + weights)")
        if not _is_model_folder(unet_folder):
            raise CheckpointError(f"{unet_folder} holds no config.json with weights")
    elif _looks_like_repo_id(spec):
        unet_folder = _download(spec, None, f"the U-Net {spec}")
        if convert_cache:
            unet_folder = _cached_flax(unet_folder, "unet", spec)
    else:
        raise CheckpointError(f"weights not found: {spec} (a local folder or a Hugging Face repo id)")

    if vae is not None:
        vp = Path(vae).expanduser()
        if vp.exists():
            vae_folder = vp / "vae" if (vp / "vae").is_dir() else vp
        elif _looks_like_repo_id(str(vae)):
            vae_folder = _download(str(vae), DEFAULT_VAE_SUBFOLDER, f"the VAE {vae}")
        else:
            raise CheckpointError(f"VAE weights not found: {vae}")
    if vae_folder is None:
        vae_folder = _download(DEFAULT_VAE_REPO, DEFAULT_VAE_SUBFOLDER, f"the SD-1.5 VAE ({DEFAULT_VAE_REPO}, subfolder vae)")
        if convert_cache:
            vae_folder = _cached_flax(vae_folder, "vae", DEFAULT_VAE_REPO)
    if not _is_model_folder(vae_folder):
        raise CheckpointError(f"{vae_folder} holds no VAE (config.json + weights)")
    return unet_folder, vae_folder


def load_models(spec: str | os.PathLike | None = None, vae: str | os.PathLike | None = None, dtype=None, **unet_options):
    """``(unet, vae)`` models for a ``--weights`` value (see :func:`resolve_weights`)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from m3ddm_jax.interop.unet import load_unet  # noqa: PLC0415
    from m3ddm_jax.interop.vae import load_vae  # noqa: PLC0415

    unet_folder, vae_folder = resolve_weights(spec, vae)
    dtype = dtype or jnp.float32
    return load_unet(unet_folder, dtype=dtype, **unet_options), load_vae(vae_folder, dtype=dtype)
