"""Where weights come from: local folders, the Hugging Face hub, and a cache of converted Flax weights.

``--weights`` (infer.py, eval.py) and :func:`resolve_weights` accept

* a local folder holding ``unet/`` and ``vae/`` (each a converted Flax folder or a PyTorch/diffusers folder),
  as ``python -m m3ddm_jax.download DIR`` writes it (:mod:`m3ddm_jax.download`);
* a local U-Net folder alone (the VAE then comes from the default VAE source);
* a Hugging Face repo id (``owner/name``) of a U-Net release; files are fetched with ``huggingface_hub``
  (safetensors preferred over ``.bin``), converted to Flax once and cached under
  ``$M3DDM_JAX_CACHE`` (default ``~/.cache/m3ddm_jax``);
* ``m3ddm`` / ``m3ddm+`` (the two releases) or ``tiny`` (the tiny random test model that ships in the
  package, :mod:`m3ddm_jax.assets`: its output is noise; for smoke runs and tests only).

Defaults: the M3DDM+ U-Net (:data:`DEFAULT_UNET_REPO`) and the SD-1.5 VAE
(:data:`DEFAULT_VAE_REPO`, subfolder ``vae``). Offline with nothing cached, one
:class:`~m3ddm_jax.errors.CheckpointError` names every missing piece and the one command that fetches them
(``python -m m3ddm_jax.download DIR``) and the folder it writes.
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
TINY = "tiny"  # --weights tiny: the tiny random U-Net + VAE shipped in m3ddm_jax/assets (noise; tests, smoke runs)
DOWNLOAD_COMMAND = "python -m m3ddm_jax.download"
LAYOUT = "DIR/unet and DIR/vae"
OFFLINE = "not in the local Hugging Face cache and the hub is unreachable"
WEIGHTS_HELP = (
    "a folder with unet/ and vae/ (as `python -m m3ddm_jax.download DIR` writes it; Flax or PyTorch layout), "
    "a U-Net folder, a Hugging Face repo id, 'm3ddm' / 'm3ddm+' (the releases, fetched and converted on first "
    f"use), or 'tiny' (the tiny random model shipped in the package: output is noise, for smoke runs and tests "
    f"only). Default: the M3DDM+ release {DEFAULT_UNET_REPO} with the SD-1.5 VAE")


class MissingWeights(CheckpointError):
    """One piece (U-Net or VAE) that is neither local nor cached and could not be fetched."""

    def __init__(self, what: str, repo_id: str, reason: str, offline: bool):
        super().__init__(f"cannot get {what}: {reason}")
        self.what, self.repo_id, self.reason, self.offline = what, repo_id, reason, offline


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


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _download(repo_id: str, subfolder: str | None, what: str) -> Path:
    """Fetch config.json + weights (safetensors preferred) of ``repo_id[/subfolder]``; return the folder.

    A U-Net may sit at the repo root or under ``unet/``; a VAE under ``subfolder`` or at the root. Offline,
    whatever the local hub cache holds is used. Not available: :class:`MissingWeights`."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover
        raise CheckpointError("huggingface_hub is needed to download weights (pip install huggingface_hub)") from e
    prefixes = [f"{subfolder}/", ""] if subfolder else ["", "unet/"]
    online = _hub_reachable()
    files, list_error = None, None
    if online:
        try:
            files = list_repo_files(repo_id)
        except Exception as e:  # not found, gated, network trouble: try the local cache below
            list_error = e
    if files is not None:
        prefix = next((p for p in prefixes if p + "config.json" in files), None)
        if prefix is None:
            raise CheckpointError(f"{repo_id} on the Hugging Face hub has no {' or '.join(p + 'config.json' for p in prefixes)}")
        weights = [f for f in files if f.startswith(prefix) and f.count("/") == prefix.count("/")]
        st = [f for f in weights if f.endswith(".safetensors")]
        bins = [f for f in weights if f.endswith(".bin")]
        if not (st or bins):
            raise CheckpointError(f"{repo_id} has no weights file (.safetensors or .bin) under '{prefix or '/'}'")
        prefixes = [prefix]
        patterns = [prefix + "config.json"] + (st[:1] if st else bins[:1])
    else:
        patterns = [p + x for p in prefixes for x in ("config.json", "*.safetensors", "*.bin")]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=files is None))
    except Exception as e:
        if files is not None:
            reason = f"the download failed ({_first_line(e)})"
        elif list_error is not None:
            reason = f"not in the local cache and the hub refused it ({_first_line(list_error)})"
        else:
            reason = OFFLINE
        raise MissingWeights(what, repo_id, reason, offline=not online) from e
    for p in prefixes:
        if _is_model_folder(folder / p):
            return folder / p
    if files is None:
        raise MissingWeights(what, repo_id, "incomplete in the local Hugging Face cache and the hub is unreachable"
                             if not online else f"not fully cached and the hub refused it ({_first_line(list_error)})",
                             offline=not online)
    raise CheckpointError(f"{repo_id}: no model (config.json + weights) found after the download")


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


def _is_vae_config(folder: Path) -> bool:
    try:
        from m3ddm_jax.interop.flax_io import read_config  # noqa: PLC0415

        cfg = read_config(folder)
    except CheckpointError:
        return False
    return cfg.get("_class_name") == "AutoencoderKL" or (cfg.get("_m3ddm_jax") or {}).get("kind") == "vae"


def _list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def missing_message(missing: list[MissingWeights], fix: str) -> str:
    """One line naming every missing piece, why, and ``fix``."""
    reasons = list(dict.fromkeys(m.reason for m in missing))
    if len(reasons) == 1:
        verb = "are" if len(missing) > 1 else "is"
        head = f"{_list([m.what for m in missing])} {verb} not on this machine: {reasons[0]}"
    else:
        head = "; ".join(f"{m.what}: {m.reason}" for m in missing)
    return f"{head}; {fix}"


def download_command(model: str | None = None, vae: str | None = None, only: str | None = None) -> str:
    """The ``python -m m3ddm_jax.download DIR ...`` line that fetches the given pieces."""
    cmd = f"{DOWNLOAD_COMMAND} DIR"
    if only != "vae":
        cmd += f" --model {model or 'm3ddm+'}"
    if only != "unet" and vae and vae != DEFAULT_VAE_REPO:
        cmd += f" --vae {vae}"
    if only:
        cmd += f" --only {only}"
    return cmd


def resolve_weights(spec: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                    convert_cache: bool = True, *, weights_flag: str = "--weights",
                    vae_flag: str = "--vae") -> tuple[Path, Path]:
    """``(unet_folder, vae_folder)`` for a ``--weights`` value (None: the M3DDM+ release).

    ``weights_flag`` / ``vae_flag`` name the options in error messages (eval.py: ``--config.weights``)."""
    given = str(spec).strip() if spec is not None else "m3ddm+"
    if given.lower() == TINY:
        from m3ddm_jax.assets import TINY_UNET, TINY_VAE  # noqa: PLC0415

        spec, local_vae = str(TINY_UNET), TINY_VAE
    else:
        spec, local_vae = KNOWN.get(given.lower(), given), None
    model_arg = given.lower() if given.lower() in KNOWN else spec  # how the download command names it
    p = Path(spec).expanduser()
    vae_folder: Path | None = local_vae
    unet_folder: Path | None = None
    missing: list[MissingWeights] = []
    if p.exists():
        if (p / "unet").is_dir():
            unet_folder = p / "unet"
            if (p / "vae").is_dir():
                vae_folder = p / "vae"
        elif _is_model_folder(p):
            if _is_vae_config(p):
                raise CheckpointError(f"{p} is a VAE folder, not a U-Net: pass it with {vae_flag} {p}, and the U-Net "
                                      f"(or a folder holding unet/ and vae/) with {weights_flag}")
            unet_folder = p
        elif (p / "vae").is_dir():
            raise CheckpointError(
                f"{p} holds vae/ but no unet/: {weights_flag} takes a folder with unet/ and vae/ ({LAYOUT}, as "
                f"`{DOWNLOAD_COMMAND} DIR` writes it); use this folder as {vae_flag} {p} and give the U-Net with "
                f"{weights_flag} (a folder, a repo id, m3ddm or m3ddm+), or fetch it with `{download_command(only='unet')}`")
        else:
            raise CheckpointError(f"{p} holds no unet/ folder and no model (config.json + weights); {weights_flag} takes "
                                  f"a folder with unet/ and vae/ ({LAYOUT}), as `{DOWNLOAD_COMMAND} DIR` writes it")
        if not _is_model_folder(unet_folder):
            raise CheckpointError(f"{unet_folder} holds no config.json with weights")
    elif _looks_like_repo_id(spec):
        try:
            unet_folder = _download(spec, None, f"the U-Net {spec}")
            if convert_cache:
                unet_folder = _cached_flax(unet_folder, "unet", spec)
        except MissingWeights as e:
            missing.append(e)
    else:
        raise CheckpointError(f"weights not found: {spec} (a local folder, a Hugging Face repo id, m3ddm, m3ddm+ or tiny)")

    vae_repo = DEFAULT_VAE_REPO
    if vae is not None and str(vae).strip():
        vp = Path(vae).expanduser()
        if vp.exists():
            vae_folder = vp / "vae" if (vp / "vae").is_dir() else vp
        elif _looks_like_repo_id(str(vae)):
            vae_repo = str(vae)
            try:
                vae_folder = _download(vae_repo, DEFAULT_VAE_SUBFOLDER, f"the VAE {vae_repo}")
                if convert_cache:
                    vae_folder = _cached_flax(vae_folder, "vae", vae_repo)
            except MissingWeights as e:
                missing.append(e)
        else:
            raise CheckpointError(f"VAE weights not found: {vae} (a VAE folder, a folder holding vae/, or a repo id)")
    elif vae_folder is None:
        try:
            vae_folder = _download(DEFAULT_VAE_REPO, DEFAULT_VAE_SUBFOLDER,
                                   f"the SD-1.5 VAE ({DEFAULT_VAE_REPO}, subfolder vae)")
            if convert_cache:
                vae_folder = _cached_flax(vae_folder, "vae", DEFAULT_VAE_REPO)
        except MissingWeights as e:
            missing.append(e)
    if missing:
        raise CheckpointError(missing_message(missing, _fix(missing, unet_folder, p, model_arg, vae_repo,
                                                            weights_flag, vae_flag)))
    if not _is_model_folder(vae_folder):
        raise CheckpointError(f"{vae_folder} holds no VAE (config.json + weights)")
    return unet_folder, vae_folder


def _fix(missing: list[MissingWeights], unet_folder: Path | None, p: Path, model_arg: str, vae_repo: str,
         weights_flag: str, vae_flag: str) -> str:
    offline = any(m.offline for m in missing)
    where = " on a machine that can reach the Hugging Face hub" if offline else ""
    copy = "copy DIR here and " if offline else ""
    if unet_folder is None and len(missing) == 2:
        return (f"run `{download_command(model_arg, vae_repo)}`{where}: it writes {LAYOUT} (converted to Flax); "
                f"{copy}pass {weights_flag} DIR")
    if unet_folder is None:
        return (f"run `{download_command(model_arg, only='unet')}`{where}: it writes DIR/unet (converted to Flax); "
                f"{copy}pass {weights_flag} DIR")
    beside = (f" (or move DIR/vae into {p}, beside its unet/)"
              if unet_folder.name == "unet" and unet_folder.parent == p else "")
    return (f"run `{download_command(vae=vae_repo, only='vae')}`{where}: it writes DIR/vae (converted to Flax); "
            f"{copy}pass {vae_flag} DIR{beside}")


def load_models(spec: str | os.PathLike | None = None, vae: str | os.PathLike | None = None, dtype=None, **unet_options):
    """``(unet, vae)`` models for a ``--weights`` value (see :func:`resolve_weights`)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from m3ddm_jax.interop.unet import load_unet  # noqa: PLC0415
    from m3ddm_jax.interop.vae import load_vae  # noqa: PLC0415

    unet_folder, vae_folder = resolve_weights(spec, vae)
    dtype = dtype or jnp.float32
    return load_unet(unet_folder, dtype=dtype, **unet_options), load_vae(vae_folder, dtype=dtype)
