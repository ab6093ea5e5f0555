"""Atomic writes: every file appears complete or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 20


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, no permission) into one line naming ``path``."""
    from storage import DigitflowError

    try:
        yield
    except OSError as e:
        if not is_disk_error(e):
            raise
        raise DigitflowError(f"{path}: cannot write ({e.strerror or e}); nothing partial was left in place") from e


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def is_disk_error(e: BaseException) -> bool:
    """A write that failed for want of space or permission (pyarrow's errors carry no errno)."""
    return isinstance(e, OSError) and (e.errno in DISK_ERRNOS or "No space left on device" in str(e)
                                       or "Read-only file system" in str(e))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and ``os.replace`` it into place.

    On any exception the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(tmp)
    try:
        with writing(path):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_path(path: str | os.PathLike) -> Path:
    """A file a user names for us to write (``--onnx FILE``): a new path or an existing regular
    file, in a folder that exists; anything else (a folder, a device, a FIFO, a socket, a
    symlink) is one line and nothing is touched. Write it with ``atomic_path``."""
    import stat

    from storage import DigitflowError

    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise DigitflowError(f"{path}: cannot write there ({e.strerror or e})") from None
    if mode is not None and not stat.S_ISREG(mode):
        what = {stat.S_ISDIR: "a folder", stat.S_ISLNK: "a symbolic link", stat.S_ISCHR: "a device",
                stat.S_ISBLK: "a device", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
        kind = next((name for test, name in what.items() if test(mode)), "not a regular file")
        raise DigitflowError(f"{path}: is {kind}; give the path of a new or regular file (nothing was written)")
    if not path.parent.is_dir():
        raise DigitflowError(f"{path.parent}: no such folder (nothing was written)")
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``path``; the kernel releases it if we die."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_leftovers(target: Path) -> None:
    """Remove what a crashed writer of ``target`` left beside it (hold the lock): staging and old
    folders (``staged_dir``, ``swap_dir``) and temp files (``atomic_path``). ``target``'s name may
    be a glob pattern, e.g. ``models/x/v*`` for every version."""
    for pattern in (f".{target.name}.staging-*", f".{target.name}.old-*", f".{target.name}.*.tmp"):
        for p in target.parent.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging_dir(target: Path) -> Path:
    """A fresh, normally-permissioned temp directory beside ``target``, for ``swap_dir``."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, limit: int | None = None):
    """The JSON in ``path``. With ``limit``: only a regular file (a FIFO would block, a device never
    end), opened without blocking, and one over ``limit`` bytes is a ValueError, never read whole."""
    if limit is None:
        with open(path, "rb") as f:
            return json.load(f)
    return json.loads(read_bounded(path, limit))


def read_bounded(path: str | os.PathLike, limit: int, *, head: bool = False, follow_symlinks: bool = True) -> bytes:
    """The bytes of regular file ``path``, at most ``limit`` of them: a larger file is a ValueError
    (``head``: its first ``limit`` bytes are returned), as is a FIFO, a device or a folder, which
    are never read; with ``follow_symlinks=False`` a symbolic link is not opened (OSError)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{Path(path).name} is not a regular file")
        data = f.read(limit + (not head))
    if len(data) > limit:
        raise ValueError(f"{Path(path).name} is larger than {limit:,} bytes")
    return data


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read 1 MiB at a time (MD5 only to compare with S3 ETags)."""
    h = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, *, lock: bool = True, replace: bool = True) -> Iterator[Path]:
    """The one idiom for writing a folder: lock + staging + swap.

    Under an exclusive lock beside ``target`` (``lock=False``: the caller holds its own), what a
    crashed writer left is cleared, a fresh staging folder is yielded to be filled, and on
    success it takes ``target``'s place whole (``replace=False``: only if ``target`` does not
    exist yet, e.g. an immutable version). On any failure the staging folder is removed and
    ``target`` is as it was; a full disk or a read-only home ends in one line naming ``target``.
    """
    target = Path(target)
    with writing(target), (file_lock(target.parent / f".{target.name}.lock") if lock else contextlib.nullcontext()):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        staging = make_staging_dir(target)
        try:
            yield staging
            if replace:
                swap_dir(staging, target)
            else:
                os.rename(staging, target)  # fails rather than overwrite
                fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def swap_dir(staging: Path, target: Path) -> None:
    """Replace directory ``target`` by ``staging`` (same parent); readers never see a mix.

    ``target`` is renamed aside, ``staging`` renamed onto it, then the old one removed. A
    crash between the two renames leaves no ``target`` at all (rebuilt on the next run),
    never a half-written one.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` and prove it is writable; raise a one-line DigitflowError otherwise."""
    from storage import DigitflowError

    path = Path(path).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        raise DigitflowError(f"home directory {path} is not writable: {e.strerror or e}") from None
    return path
