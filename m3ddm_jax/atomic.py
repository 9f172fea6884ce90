"""Atomic writes: temporary dot-names beside the destination, the user's umask, no partial file left behind.

Every writer of the project writes to ``.<name>.partial-<pid>-<host>-<random><suffix>`` in the destination's folder
and renames it over the destination only when the data is complete (flushed and fsynced), so the destination
holds either its old content or the complete new one, never a partial file, whatever the failure (an
exception, a full disk, SIGKILL). Only a killed process can leave its dot-named temporary behind; the next
write to the same destination removes temporaries whose process is gone (:func:`clean_stale`; only those made
on this machine, ``<host>`` being a short hash of its name, so a live writer elsewhere on a shared file system
is never touched).

Temporaries are created with mode ``0o666`` (files) / ``0o777`` (folders) minus the umask, like any file the
user creates (``tempfile.mkstemp`` would give ``0o600``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from m3ddm_jax.errors import CheckpointError, UserError

MARK = ".partial-"
# this machine, in temporaries' names: a pid is only checked on the machine that owns it (shared file systems)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def partial_name(dest: Path, suffix: str | None = None) -> Path:
    """A fresh temporary name for ``dest`` in its folder (keeps ``dest``'s suffix: some writers pick the
    format from it)."""
    suffix = dest.suffix if suffix is None else suffix
    return dest.parent / f".{dest.name}{MARK}{os.getpid()}-{_HOST}-{secrets.token_hex(4)}{suffix}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(dest: Path) -> list[Path]:
    """Remove the temporaries of ``dest`` left by killed processes (their pid is gone); returns them."""
    removed = []
    prefix = f".{dest.name}{MARK}"
    try:
        entries = list(dest.parent.iterdir()) if dest.parent.is_dir() else []
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        parts = p.name[len(prefix):].split("-")
        if len(parts) < 3 or not parts[0].isdigit() or parts[1] != _HOST:
            continue  # not ours, or another machine's (its pid means nothing here)
        pid = int(parts[0])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed


def new_file(dest: Path, suffix: str | None = None) -> Path:
    """Create an empty temporary file for ``dest`` (mode 0o666 minus the umask) and return its path."""
    clean_stale(dest)
    for _ in range(100):
        tmp = partial_name(dest, suffix)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot write to {dest.parent}: {e.strerror or e}") from e
    raise UserError(f"cannot create a temporary file in {dest.parent}")


def new_dir(dest: Path) -> Path:
    """Create an empty temporary folder for ``dest`` (mode 0o777 minus the umask) and return its path."""
    clean_stale(dest)
    for _ in range(100):
        tmp = partial_name(dest, "")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot write to {dest.parent}: {e.strerror or e}") from e
    raise UserError(f"cannot create a temporary folder in {dest.parent}")


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_mode(path: Path) -> None:
    """Give ``path`` the mode a newly created file (0o666) or folder (0o777) gets under the user's umask
    (some writers, safetensors among them, create their files 0o600)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def fsync_path(path: Path) -> None:
    """Flush a written file to disk (a full disk can surface only here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove a temporary file or folder; never raises."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def replace(src: Path, dest: Path) -> None:
    """``os.replace`` that also works across file systems (copied to a temporary beside ``dest`` first)."""
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = new_file(dest)
        try:
            shutil.copyfile(src, tmp)
            fsync_path(tmp)
            os.replace(tmp, dest)
        finally:
            remove(tmp)
        os.unlink(src)


class WriteError(CheckpointError):
    """Writing ``path`` failed (a full disk, a read-only folder); ``why`` is the system's reason."""

    def __init__(self, path, why: str):
        super().__init__(f"cannot write {path}: {why}")
        self.path, self.why = path, why


def reason(e: BaseException) -> str:
    """One line for a write failure (``No space left on device``, ``File too large``, ...): the OS error behind
    a library's own exception when there is one."""
    seen = set()
    cur = e
    while cur is not None and id(cur) not in seen:  # torch wraps the OSError of the file object it writes to
        seen.add(id(cur))
        if isinstance(cur, WriteError):
            return cur.why
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
        cur = cur.__cause__ or cur.__context__
    text = (str(e).strip().splitlines() or [""])[0].strip()
    m = re.search(r"\(os error (\d+)\)", text)  # safetensors: "I/O error: No space left on device (os error 28)"
    if m:
        return os.strerror(int(m.group(1)))
    return text or type(e).__name__


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, suffix: str | None = None):
    """``with atomic_file(dest) as tmp: write(tmp)``: ``tmp`` replaces ``dest`` when the block succeeds; any
    exception removes ``tmp`` and leaves ``dest`` as it was. Write errors become a one-line :class:`UserError`."""
    dest = Path(dest)
    tmp = new_file(dest, suffix)
    try:
        yield tmp
        default_mode(tmp)
        fsync_path(tmp)
        os.replace(tmp, dest)
    except UserError:
        raise
    except OSError as e:
        raise WriteError(dest, reason(e)) from e
    finally:
        remove(tmp)
