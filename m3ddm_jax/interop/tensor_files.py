"""Weight files read and written one tensor at a time.

Loading a model must not hold a second host copy of its weights: a full-size U-Net is 4.84 GiB in fp32, and
a whole state dict in memory next to the model's buffers doubles the resident memory of every run (freed
host memory is not even returned to the system under the malloc tuning of :mod:`m3ddm_jax.runtime`). So

* :class:`SafetensorsFile` parses the ``.safetensors`` header and reads each tensor on request with
  ``pread`` into a buffer of the caller's choice (no memory map, so the file's pages never count as this
  process's memory); :class:`TorchBinFile` does the same for a ``torch.save`` file through torch's memory map,
  handing each tensor's pages back after it was copied;
* :func:`aligned_empty` allocates 64-byte aligned arrays: on CPU, ``jax.device_put`` adopts such a numpy
  array as the device buffer without copying it (it copies unaligned ones), so a converted tensor is the
  model's parameter itself;
* :func:`write_safetensors` writes a ``.safetensors`` file from a header and one tensor at a time.

Every source is a read-only ``Mapping[str, np.ndarray]`` (``source[key]`` reads the tensor anew; nothing is
cached) with ``meta(key) -> (shape, dtype)`` known without reading the data. :class:`ArraySource` gives
an in-memory dict the same interface.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from m3ddm_jax.errors import CheckpointError

ALIGN = 64  # bytes; XLA:CPU adopts host buffers aligned to this without a copy
_MAX_HEADER = 100 * 2**20


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a :data:`ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    base = np.empty(nbytes + ALIGN, np.uint8)
    off = (-base.ctypes.data) % ALIGN
    return base[off:off + nbytes].view(dtype).reshape(shape)


def _st_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes  # noqa: PLC0415

    out = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
           "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    return {k: np.dtype(v) for k, v in out.items()}


def st_dtype_name(dtype) -> str:
    """The safetensors name (``F32``, ``BF16``, ...) of a numpy dtype."""
    dtype = np.dtype(dtype)
    for name, dt in _st_dtypes().items():
        if dt == dtype:
            return name
    raise CheckpointError(f"safetensors cannot store dtype {dtype}")


class TensorSource(Mapping):
    """Base of the read-on-access sources: ``meta``, ``read`` and the Mapping protocol on top of them."""

    reads_into = True  # read(key, out) fills ``out`` (a scratch buffer) instead of allocating

    def meta(self, key: str) -> tuple[tuple, np.dtype]:
        raise NotImplementedError

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor ``key``; with ``out`` (a uint8 buffer of at least its byte size) its bytes are read into
        ``out`` and a view of ``out`` is returned, valid until the next read into ``out``."""
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        shape, dtype = self.meta(key)
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize

    def __getitem__(self, key: str) -> np.ndarray:
        return self.read(key)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArraySource(TensorSource):
    """An in-memory ``{key: array}`` as a :class:`TensorSource` (reads return the arrays themselves)."""

    reads_into = False

    def __init__(self, arrays: Mapping):
        self._arrays = arrays

    def meta(self, key):
        a = self._arrays[key]
        if isinstance(a, np.ndarray):
            return tuple(a.shape), a.dtype
        a = np.asarray(a)
        return tuple(a.shape), a.dtype

    def read(self, key, out=None):
        return np.asarray(self._arrays[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __contains__(self, key) -> bool:
        return key in self._arrays


def as_source(arrays) -> TensorSource:
    return arrays if isinstance(arrays, TensorSource) else ArraySource(arrays)


class SafetensorsFile(TensorSource):
    """A ``.safetensors`` file: header parsed and checked on opening, tensors read with ``pread`` on request.

    The file stays open until :meth:`close` (or garbage collection), so a file replaced meanwhile (an atomic
    rename over it) is still read consistently. Errors are one-line :class:`CheckpointError` messages."""

    def __init__(self, path: str | os.PathLike, what: str = "weights file"):
        self.path = Path(path)
        self._what = what
        self._fd = None
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise CheckpointError(f"cannot read {what} {self.path}: {e.strerror or e}") from e
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    def _fail(self, reason: str) -> CheckpointError:
        return CheckpointError(f"cannot read {self._what} {self.path}: {reason}")

    def _parse(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._fail("not a safetensors file (shorter than its header size)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise self._fail("not a safetensors file (header size out of range)")
        raw = os.pread(self._fd, n, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"not a safetensors file (header is not JSON: {e})") from e
        if not isinstance(header, dict):
            raise self._fail("not a safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        dtypes = _st_dtypes()
        data_start, data_size = 8 + n, size - 8 - n
        self._info: dict[str, tuple[tuple, np.dtype, int, int]] = {}
        spans = []
        for key, info in header.items():
            try:
                dtype = dtypes[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise self._fail(f"bad header entry for {key!r} ({type(e).__name__}: {e})") from e
            if any(s < 0 for s in shape) or not 0 <= begin <= end:
                raise self._fail(f"bad shape or offsets for {key!r}")
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise self._fail(f"tensor {key!r}: {end - begin} bytes for shape {list(shape)} {dtype}")
            if end > data_size:
                raise self._fail(f"truncated (tensor {key!r} ends at byte {data_start + end}, the file has {size})")
            self._info[key] = (shape, dtype, data_start + begin, end - begin)
            spans.append((begin, end))
        spans.sort()
        at = 0
        for begin, end in spans:
            if begin != at:
                raise self._fail("tensor data overlap or leave gaps")
            at = end
        self._keys = sorted(self._info)

    def meta(self, key):
        shape, dtype, _, _ = self._info[key]
        return shape, dtype

    def read(self, key, out=None):
        shape, dtype, offset, nbytes = self._info[key]
        if self._fd is None:
            raise self._fail("the file was closed")
        if out is not None and out.nbytes >= nbytes:
            buf = out.reshape(-1).view(np.uint8)[:nbytes]
        else:
            buf = aligned_empty((nbytes,), np.uint8)
        view, done = memoryview(buf), 0
        while done < nbytes:  # one read returns at most ~2 GiB on Linux
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise self._fail(f"{e.strerror or e} reading {key!r}") from e
            if got == 0:
                raise self._fail(f"truncated while reading {key!r}")
            done += got
        return buf.view(dtype).reshape(shape)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._info

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


class TorchBinFile(TensorSource):
    """A ``torch.save`` state dict (``weights_only=True``), memory-mapped where the file allows it (the zip
    format of torch >= 1.6); each tensor's mapped pages are handed back (``madvise``) once it was copied, so
    reading the whole file does not leave it resident."""

    def __init__(self, path: str | os.PathLike, what: str = "weights file"):
        from m3ddm_jax.interop.torch_io import _import_torch  # noqa: PLC0415

        self.path = Path(path)
        torch = self._torch = _import_torch()
        self._mmapped = True
        try:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # the legacy (non-zip) format cannot be mapped; a corrupt file fails again below
                self._mmapped = False
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or truncated file
            raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e
        if isinstance(sd, dict) and "state_dict" in sd and not any(hasattr(v, "shape") for v in sd.values()):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointError(f"cannot read {what} {path}: it holds a {type(sd).__name__}, not a state dict")
        for k, v in sd.items():
            if not hasattr(v, "detach"):
                raise CheckpointError(f"{path}: entry {k!r} is not a tensor")
        self._sd = sd

    def _numpy(self, t) -> np.ndarray:
        t = t.detach()
        if t.dtype == self._torch.bfloat16:
            import ml_dtypes  # noqa: PLC0415

            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def meta(self, key):
        t = self._sd[key]
        return tuple(t.shape), self._numpy(t).dtype  # a view: no data is touched

    def read(self, key, out=None):
        t = self._sd[key]
        src = self._numpy(t)
        if out is not None and out.nbytes >= src.nbytes:
            dst = out.reshape(-1).view(np.uint8)[:src.nbytes].view(src.dtype).reshape(src.shape)
        else:
            dst = aligned_empty(src.shape, src.dtype)
        np.copyto(dst, src)
        if self._mmapped and t.is_contiguous():
            _dontneed(t.data_ptr(), src.nbytes)
        return dst

    def __iter__(self):
        return iter(self._sd)

    def __len__(self):
        return len(self._sd)

    def __contains__(self, key):
        return key in self._sd

    def close(self):
        self._sd = {}


_MADV_DONTNEED = 4
_madvise = None


def _dontneed(addr: int, nbytes: int) -> None:
    """Drop the whole pages of ``[addr, addr + nbytes)`` from this process (a read-only private file map:
    the pages are read from the file again if touched)."""
    global _madvise
    if not sys.platform.startswith("linux"):
        return
    if _madvise is None:
        import ctypes  # noqa: PLC0415
        import ctypes.util  # noqa: PLC0415

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _madvise = libc.madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-addr // page) * page
    end = (addr + nbytes) // page * page
    if end > start:
        _madvise(start, end - start, _MADV_DONTNEED)


def open_tensor_file(path: str | os.PathLike, what: str = "weights file") -> TensorSource:
    """A read-on-access source for a ``.safetensors`` or ``.bin``/``.pt``/``.pth`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path, what)
    if path.suffix in (".bin", ".pt", ".pth"):
        return TorchBinFile(path, what)
    raise CheckpointError(f"unknown weights file type {path.suffix!r}: {path} (expected .safetensors or .bin)")


def shape_of(arrays: Mapping, key) -> tuple:
    """The shape of ``arrays[key]``, without reading it when ``arrays`` knows its metadata."""
    meta = getattr(arrays, "meta", None)
    if meta is not None:
        return tuple(meta(key)[0])
    return tuple(np.shape(arrays[key]))


def dtype_of(arrays: Mapping, key) -> np.dtype:
    meta = getattr(arrays, "meta", None)
    if meta is not None:
        return np.dtype(meta(key)[1])
    a = arrays[key]
    return a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype


def write_safetensors(path: str | os.PathLike, specs: Iterable[tuple[str, tuple, np.dtype]],
                      tensor: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write a ``.safetensors`` file holding one tensor at a time in memory.

    ``specs``: ``(name, shape, dtype)`` of every tensor, in file order; ``tensor(name)`` is called once per
    name, in that order, and must return an array of that shape (its dtype is cast to the spec's)."""
    specs = [(str(n), tuple(int(s) for s in shape), np.dtype(dt)) for n, shape, dt in specs]
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    at = 0
    for name, shape, dt in specs:
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": st_dtype_name(dt), "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dt in specs:
            arr = np.asarray(tensor(name))
            if tuple(arr.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {list(arr.shape)}, the header says {list(shape)}")
            arr = np.ascontiguousarray(arr, dtype=dt)
            f.write(arr.reshape(-1).view(np.uint8).data)
            del arr
