"""``python -m m3ddm_jax.download DIR``: fetch and convert every weight the outpainter needs into one folder.

    python -m m3ddm_jax.download weights                  # M3DDM+ U-Net + SD-1.5 VAE -> weights/unet, weights/vae
    python -m m3ddm_jax.download weights --model m3ddm    # the original M3DDM release instead
    python infer.py clip.mp4 --ratio 16:9 --weights weights

(installed as ``m3ddm-download`` too). The U-Net comes from the release repo (``--model m3ddm+``:
``MurakawaTakuya/M3DDM-Plus``, ``m3ddm``: ``alimama-creative/M3DDM-Video-Outpainting``, or any repo id),
the VAE from ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (subfolder ``vae``); both are fetched with
``huggingface_hub`` (into its cache, so an interrupted run resumes; ``HF_ENDPOINT`` selects a mirror,
``HF_TOKEN`` a token) and converted to Flax. DIR then holds exactly the layout ``--weights`` takes:

    DIR/unet/config.json, DIR/unet/flax_model.safetensors
    DIR/vae/config.json,  DIR/vae/flax_model.safetensors

Everything is written to a temporary folder next to DIR and renamed into place at the end: an interrupted
or failed run leaves DIR as it was. A non-empty DIR is refused unless ``--overwrite`` (which replaces
``DIR/unet`` and ``DIR/vae`` only; other files in DIR are left alone). Offline (or with
``HF_HUB_OFFLINE=1``) whatever the local hub cache holds is used; what is missing is named in one line
(exit code 1).
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from m3ddm_jax.cli_common import OneLineParser, run_main
from m3ddm_jax.errors import CheckpointError, UserError

PROG = "m3ddm-download"
MODELS = ("m3ddm+", "m3ddm")
DTYPES = ("keep", "float32", "float16", "bfloat16")


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _check_target(dest: Path, overwrite: bool, pieces: tuple[str, ...]) -> None:
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is a file, not a folder")
    if dest.is_dir():
        entries = sorted(p.name for p in dest.iterdir())
        if entries and not overwrite:
            shown = ", ".join(entries[:4]) + (f" (+{len(entries) - 4} more)" if len(entries) > 4 else "")
            has = [s for s in ("unet", "vae") if (dest / s / "config.json").is_file()]
            already = f"; it already holds {' and '.join(s + '/' for s in has)} (use it with --weights {dest})" if has else ""
            raise UserError(f"{dest} is not empty ({shown}){already}; choose a new or empty folder, or pass --overwrite "
                            f"to replace {' and '.join(f'{dest / s}' for s in pieces)} (nothing else in it is touched)")
    probe = dest.parent  # the temporary folder is made next to DIR
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"cannot write to {probe}")


def _fetch_all(jobs: list[tuple[str, str, str | None, str]]) -> dict[str, Path]:
    """Fetch each ``(piece, repo, subfolder, what)``; report every missing piece in one error."""
    from m3ddm_jax import weights as W  # noqa: PLC0415

    got, missing = {}, []
    online = W._hub_reachable()  # offline: no progress lines, just the one error line (or the cached files)
    for piece, repo, sub, what in jobs:
        t0 = time.perf_counter()
        if online:
            _say(f"fetching {what} from the Hugging Face hub ...")
        try:
            got[piece] = W._download(repo, sub, what)
        except W.MissingWeights as e:
            missing.append(e)
            continue
        _say(f"{piece}: {repo} ({human_size(_size(got[piece]))}{'' if online else ', from the local hub cache'}) "
             f"in {time.perf_counter() - t0:.1f} s")
    if missing:
        offline = all(m.offline for m in missing)
        fix = ("run this command on a machine that can reach the hub (or set HF_ENDPOINT to a mirror) and copy the "
               "folder here" if offline else "check the repo id, your network and HF_TOKEN, and run it again")
        raise CheckpointError(W.missing_message(missing, fix))
    return got


def _convert(src: Path, dst: Path, piece: str, dtype: str) -> None:
    from m3ddm_jax.interop.cli import convert_folder, model_kind  # noqa: PLC0415

    kind = model_kind(src)
    if kind != piece:
        raise CheckpointError(f"{src} holds a {kind}, not a {piece}")
    t0 = time.perf_counter()
    _say(f"converting the {'U-Net' if piece == 'unet' else 'VAE'} to Flax"
         f"{'' if dtype == 'keep' else ' (' + dtype + ')'} ...")
    convert_folder(src, dst, dtype=dtype)
    _say(f"  {piece}/: {human_size(_size(dst))} ({time.perf_counter() - t0:.1f} s)")


def _install(tmp: Path, dest: Path, pieces: tuple[str, ...]) -> None:
    """Move the finished pieces into ``dest``: one rename when ``dest`` is new or empty, else per piece."""
    if not dest.exists() or not any(dest.iterdir()):
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
        return
    for piece in pieces:
        target = dest / piece
        old = None
        if target.exists() or target.is_symlink():
            old = tmp / f".old-{piece}"
            os.replace(target, old)
        os.replace(tmp / piece, target)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def download(dest: str | os.PathLike, model: str = "m3ddm+", vae: str | None = None, only: str | None = None,
             dtype: str = "keep", overwrite: bool = False) -> Path:
    """Fetch and convert into ``dest`` (``dest/unet``, ``dest/vae``); returns ``dest``."""
    from m3ddm_jax import weights as W  # noqa: PLC0415

    dest = Path(dest).expanduser()
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    pieces = ("unet", "vae") if only is None else (only,)
    _check_target(dest, overwrite, pieces)
    repo = W.KNOWN.get(model.lower(), model)
    if not W._looks_like_repo_id(repo):
        raise UserError(f"--model must be m3ddm+, m3ddm or a Hugging Face repo id (owner/name), got {model!r}")
    vae_repo = vae or W.DEFAULT_VAE_REPO
    if not W._looks_like_repo_id(vae_repo):
        raise UserError(f"--vae must be a Hugging Face repo id (owner/name), got {vae!r}")
    jobs = []
    if "unet" in pieces:
        jobs.append(("unet", repo, None, f"the U-Net {repo}"))
    if "vae" in pieces:
        vae_what = (f"the SD-1.5 VAE ({vae_repo}, subfolder vae)" if vae_repo == W.DEFAULT_VAE_REPO
                    else f"the VAE {vae_repo}")
        jobs.append(("vae", vae_repo, W.DEFAULT_VAE_SUBFOLDER, vae_what))
    fetched = _fetch_all(jobs)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {dest.parent}: {e.strerror or e}") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download-", dir=dest.parent))
    try:
        for piece in pieces:
            _convert(fetched[piece], tmp / piece, piece, dtype)
        tmp.chmod(0o755)
        _install(tmp, dest, pieces)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description="Fetch the M3DDM/M3DDM+ U-Net and the SD-1.5 VAE from the Hugging Face "
                                               "hub and convert both to Flax into one folder.",
                      epilog="Layout written: DIR/unet and DIR/vae (converted Flax folders: config.json + "
                             "flax_model.safetensors), exactly what `infer.py --weights DIR` takes. Files already in "
                             "the Hugging Face cache are not fetched again (offline too); HF_ENDPOINT selects a mirror, "
                             "HF_TOKEN a token.")
    p.add_argument("dir", metavar="DIR", help="output folder (created; must be new or empty unless --overwrite)")
    p.add_argument("--model", default="m3ddm+",
                   help="U-Net release: m3ddm+ (MurakawaTakuya/M3DDM-Plus, default), m3ddm "
                        "(alimama-creative/M3DDM-Video-Outpainting), or any Hugging Face repo id")
    p.add_argument("--vae", default=None,
                   help="VAE repo id (default stable-diffusion-v1-5/stable-diffusion-v1-5, subfolder vae)")
    p.add_argument("--only", choices=("unet", "vae"), default=None,
                   help="fetch one piece only (DIR/unet or DIR/vae); a vae-only folder is used with --vae DIR")
    p.add_argument("--dtype", choices=DTYPES, default="keep",
                   help="cast the float weights when converting (default: keep the released dtype)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty DIR: replace DIR/unet and DIR/vae (other files are left alone)")
    args = p.parse_args(argv)

    def run() -> int:
        from m3ddm_jax import weights as W  # noqa: PLC0415

        t0 = time.perf_counter()
        dest = download(args.dir, args.model, args.vae, args.only, args.dtype, args.overwrite)
        pieces = ("unet", "vae") if args.only is None else (args.only,)
        repos = {"unet": W.KNOWN.get(args.model.lower(), args.model), "vae": args.vae or W.DEFAULT_VAE_REPO}
        sizes = {s: _size(dest / s) for s in pieces}
        shown = shlex.quote(str(dest))
        if str(dest).lower() in (*W.KNOWN, W.TINY):  # a bare alias would name the release, not the folder
            shown = f"./{shown}"
        parts = " + ".join(f"{s}/ {human_size(sizes[s])} ({repos[s]})" for s in pieces)
        total = f" = {human_size(sum(sizes.values()))}" if len(pieces) > 1 else ""
        print(f"wrote {dest}: {parts}{total}, converted to Flax, in {time.perf_counter() - t0:.0f} s; use it: "
              f"python infer.py INPUT --ratio 16:9 {'--vae' if args.only == 'vae' else '--weights'} {shown}", flush=True)
        return 0

    return run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
