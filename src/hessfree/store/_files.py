"""File-system helpers of the store: space reservation, named OS errors and the writer's lock."""

from __future__ import annotations

import errno
import os
import socket
import warnings
from pathlib import Path

from .errors import REBUILD, StoreCorruptError, StoreError, StoreFullError, StoreLockedError

try:  # POSIX; elsewhere a store is not locked against a second writer
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except (AttributeError, OSError):
        return None
    return st.f_bavail * st.f_frsize


def os_error(e: OSError, path: Path, doing: str) -> StoreError:
    """A named store error for an ``OSError`` raised while ``doing`` something at ``path``."""
    if e.errno in _FULL_ERRNOS:
        free = _free_bytes(path)
        left = f"{free:,} bytes are free there" if free is not None else "the disk is full"
        return StoreFullError(
            f"no space left while {doing} in the store at {str(path)!r} ({left}); free some space (or pass "
            "another store path) and run est.fit(train) again: the store resumes from its last recorded batch"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(
            f"cannot write the store at {str(path)!r} while {doing}: {e.strerror or e}; pass a folder you can "
            "write to (or make this one writable)"
        )
    return StoreError(f"{doing} in the store at {str(path)!r} failed: {e}")


def _check_path(path: Path) -> None:
    """Refuse a store path that is a file, or lies under one."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                below = "" if p == path else f" (the store path {str(path)!r} lies under it)"
                raise StoreError(
                    f"{str(p)!r} is a file, not a folder{below}; pass a folder path for the store (it is "
                    "created if missing)"
                )
            return


def _reserve(file: Path, size: int) -> None:
    """Make ``file`` exactly ``size`` bytes with its blocks allocated (so that later
    writes through a memory map cannot fail for lack of space)."""
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
        if size == 0:
            return
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOSYS", -1)):
                    raise
        chunk = b"\0" * (1 << 20)
        os.lseek(fd, 0, os.SEEK_SET)
        left = size
        while left:
            left -= os.write(fd, chunk[: min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)


def check_space(path: Path, files: list[tuple[str, int]], extra: int, shape: str) -> None:
    """Refuse to create ``files`` (``(name, bytes)`` in ``path``) plus ``extra`` bytes of
    records when the disk has less free space (:class:`StoreFullError`, naming both)."""
    missing = 0
    for name, size in files:
        f = path / name
        have = f.stat().st_blocks * 512 if f.exists() and hasattr(os.stat_result, "st_blocks") else 0
        missing += max(0, size - have)
    needed = missing + extra
    free = _free_bytes(path)
    total = sum(size for _, size in files)
    if free is not None and needed > free:
        raise StoreFullError(
            f"not enough space for the store at {str(path)!r}: it needs {needed:,} bytes "
            f"({_human(needed)}: {shape}, {_human(total)} of arrays, "
            f"and its records) but {free:,} bytes ({_human(free)}) are free there; free some space or pass "
            "another store path, then run est.fit(train) again"
        )


def reserve_all(path: Path, files: list[tuple[str, int]]) -> None:
    """Reserve the space of every file (and make ``progress/``), or raise a named error."""
    try:
        (path / "progress").mkdir(exist_ok=True)
        for name, size in files:
            _reserve(path / name, size)
    except OSError as e:
        free = _free_bytes(path)
        if e.errno in _FULL_ERRNOS:
            total = sum(size for _, size in files)
            left = f"{free:,} bytes ({_human(free)}) are" if free is not None else "less is"
            raise StoreFullError(
                f"not enough space for the store at {str(path)!r}: its arrays need {total:,} bytes "
                f"({_human(total)}) but {left} free there; free some space or pass another store path, then "
                "run est.fit(train) again"
            ) from e
        raise os_error(e, path, "reserving the space of the arrays") from e


def check_sizes(path: Path, files: list[tuple[str, int]], n: int) -> None:
    """Refuse a store whose files (``(name, bytes)``) are missing or of another size (:class:`StoreCorruptError`)."""
    for name, size in files:
        f = path / name
        try:
            have = f.stat().st_size
        except FileNotFoundError:
            raise StoreCorruptError(f"{str(f)!r} is missing from the store; {REBUILD}") from None
        if have != size:
            raise StoreCorruptError(
                f"{str(f)!r} has {have} bytes but should have {size} ({n} rows); the store is damaged "
                f"({'a truncated copy?' if have < size else 'written to by another program?'}): {REBUILD}"
            )


class _Lock:
    """An exclusive ``flock`` on ``<store>/.lock``, which records the holder's process id."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self) -> None:
        file = self.path / ".lock"
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, self.path, "creating the lock file") from e
        if fcntl is None:  # pragma: no cover
            self.fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            except OSError:
                pass
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOSYS", -1)):
                warnings.warn(f"the file system of {str(self.path)!r} does not support locks ({e.strerror}); the store "
                              "is written unlocked: let no other process write it at the same time", stacklevel=4)  # fmt: skip
                self.fd = fd
                return
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise os_error(e, self.path, "locking the store") from e
            who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
            raise StoreLockedError(
                f"the store at {str(self.path)!r} is being written by {who}; wait for it to finish (est.fit then "
                "reuses the store) or pass another store path"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without its note
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the descriptor releases the flock
