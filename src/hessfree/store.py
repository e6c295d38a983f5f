"""On-disk store of per-example training features (projected gradients), one per member.

Layout of a store folder::

    meta.json              format, configuration + fingerprints, state; the data hash once complete
    m{m}.features          (n, dim_m) raw array (numpy memmap), fp32 / fp16 / bf16
    m{m}.sqnorm            (n,) float64 squared feature norms (computed in fp32 before rounding)
    example.pt             the estimator's probe: the first two training examples, cloned
    progress/m{m}.r{r}.json  the batches rank r has written and flushed:
                           [offset, count, data hash, features crc32, sqnorm crc32] each
    .lock                  the writer's lock (``fcntl.flock``) and its process id

Crash safety. ``meta.json`` is written first (state ``"allocating"``), then
the space of every file is reserved, ``example.pt`` is saved, and the state
becomes ``"writing"``. Rows are written to the memmap and flushed *before*
their batch is added to the rank's progress file (replaced atomically), and
``"complete": true`` is written only after every row of every member is
covered. A run killed at any point therefore resumes from the last recorded
batch and gives the same arrays as an uninterrupted run; a folder left by a
run killed before its first ``meta.json`` (only temporary files, the lock, an
empty ``progress/``) is created anew, and a half-written store is never taken
for a complete one.

What is checked. The configuration holds the model, the parameter
selection, the projection, the members, the storage dtype, the estimator, the
task and its options, and the per-example losses of the stored examples
(rounded, compared to a relative 1e-4). Every written batch records a hash of
its data (inputs, labels, sample weights); the complete store records one hash
of all of them. Reopening with data hashes the data again, so any changed
value is found (:class:`StoreMismatchError`, naming the rows). Each written
batch also records crc32 checksums of its stored bytes, verified whenever the
rows are read, and every file's size is checked on open
(:class:`StoreCorruptError`). The space of the files is reserved when the
store is created (:class:`StoreFullError` names the bytes needed and free), a
second writer is refused (:class:`StoreLockedError`, naming the writing
process), and a store of an earlier format is refused with the advice to
rebuild it (:class:`StoreFormatError`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import atomic_save, atomic_write_json, check_settings
from .data import combine_hashes, new_hash, update_hash
from .errors import HessfreeError

try:  # POSIX; elsewhere a store is not locked against a second writer
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT = 2
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
LOSS_RTOL = 1e-4
"""Relative tolerance of the stored examples' losses (float rounding on another device passes)."""
_REBUILD = "delete the folder (or pass a new store path) and run est.fit(train) to write it again"
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


class StoreError(HessfreeError, OSError):
    """The store cannot be used as asked (a path that is a file, a folder that
    cannot be written); the message names the path and the fix."""


class StoreMismatchError(StoreError, ValueError):
    """The store on disk was written with a different model, loss, data or
    configuration (the message names what differs), or is incomplete."""


class StoreFormatError(StoreMismatchError):
    """The store was written by an earlier version of hessfree, in a format
    whose fingerprints cannot be checked; rebuild it."""


class StoreCorruptError(StoreError):
    """A store file has the wrong size, or rows whose bytes no longer match the
    checksum recorded when they were written."""


class StoreFullError(StoreError):
    """Not enough disk space for the store (at open: the bytes needed and free),
    or a write ran out of space; nothing written is lost and ``fit`` resumes
    once space is freed."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the path given."""


# ---- fingerprints ---------------------------------------------------------------------------


def fingerprint_tensors(named: dict[str, torch.Tensor]) -> str:
    """Hash of names, shapes, dtypes and values of a dict of tensors."""
    h = new_hash()
    for k in sorted(named):
        h.update(f"{k}|".encode())
        update_hash(h, named[k])
    return h.hexdigest()[:32]


def fingerprint_data(source, samples: int = 64) -> str:
    """Hash of the size and of ``samples`` evenly spaced examples of a DataSource
    (:meth:`hessfree.data.DataSource.fingerprint`)."""
    return source.fingerprint(samples)


def rounded_losses(values: Any, digits: int = 7) -> list[float]:
    """Per-example losses rounded to ``digits`` significant digits (stored in the config)."""
    out = []
    for v in np.asarray(values, dtype=np.float64).reshape(-1):
        out.append(float(f"{v:.{digits}g}") if math.isfinite(v) else repr(float(v)))
    return out


def _losses_match(a: Any, b: Any) -> bool:
    if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)):
        return a == b
    try:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        return a == b
    scale = max(float(np.max(np.abs(x), initial=0.0)), float(np.max(np.abs(y), initial=0.0)))
    return bool(np.all(np.abs(x - y) <= LOSS_RTOL * np.maximum(np.abs(x), np.abs(y)) + 1e-9 * scale + 1e-12))


# ---- files ----------------------------------------------------------------------------------


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


def _os_error(e: OSError, path: Path, doing: str) -> StoreError:
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


class _Lock:
    """An exclusive ``flock`` on ``<store>/.lock``, which records the holder's process id."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self) -> None:
        file = self.path / ".lock"
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _os_error(e, self.path, "creating the lock file") from e
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
                raise _os_error(e, self.path, "locking the store") from e
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


# ---- the store -----------------------------------------------------------------------------


class GradientStore:
    """A folder of per-member feature arrays (see the module docstring).

    Open with :meth:`open` (to write or reuse) or :meth:`open_existing` (a
    complete store, to read); the estimator does this for
    ``hf.Influence(store=path)``.

    Attributes:
        path: the folder.
        config: the configuration it was written with.
        n: number of training examples (rows).
        dims: feature dimension of each member.
        integrity_seconds: seconds this object spent on checksums (writing and
            verifying rows) and on data hashes added with :meth:`add_integrity_time`.
    """

    def __init__(self, path: Path, config: dict[str, Any], meta: dict[str, Any] | None = None):
        self.path, self.config = path, config
        self.n = int(config["n"])
        self.dims = [int(d) for d in config["dims"]]
        self.dtype = config["dtype"]
        self._np_dtype = DTYPES[self.dtype]
        self._meta = meta or {}
        self._lock: _Lock | None = None
        self._records_cache: dict[int, list[tuple]] = {}
        self.integrity_seconds = 0.0

    # ---- opening --------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, config: dict[str, Any], create: bool = True,
             example: Any = None) -> GradientStore:  # fmt: skip
        """Open the store at ``path`` for ``config``, creating it when absent.

        A complete store is returned as it is (read only; no lock taken). An
        incomplete or new one is locked for this process (:meth:`release` when
        done) and created or checked; ``example`` (a small batch) is saved as
        ``example.pt`` with a new store. Only one process (rank 0) should create
        a store; others call this with ``create=False`` after it.

        Raises:
            StoreMismatchError: the folder holds a store written with another
                configuration, or is not a hessfree store.
            StoreFormatError: a store of an earlier format.
            StoreCorruptError: a file of the wrong size.
            StoreFullError: not enough free space for the files.
            StoreLockedError: another process is writing the store.
            StoreError: the path is a file, or the folder cannot be written.
        """
        path = Path(path)
        if config.get("dtype") not in DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {config.get('dtype')!r}")
        config = {**config, "format": FORMAT}
        _check_path(path)
        meta = cls._read_meta(path)
        if meta is not None and (meta.get("complete") or not create):
            return cls._checked(path, meta, config)
        if not create:
            raise StoreNotFoundError(f"no store at {str(path)!r}")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, path, "creating the folder") from e
        lock = _Lock(path)
        lock.acquire()
        try:
            meta = cls._read_meta(path)  # again, now that no other writer can change it
            if meta is not None:
                store = cls._checked(path, meta, config)
                if meta.get("state") == "allocating":
                    store._create(example)
            else:
                cls._check_fresh(path)
                store = cls(path, config, {"format": FORMAT, "config": config})
                store._create(example)
        except BaseException:
            lock.release()
            raise
        if store.complete:
            lock.release()
        else:
            store._lock = lock
        return store

    @classmethod
    def open_existing(cls, path: str | os.PathLike) -> GradientStore:
        """Open a complete store without knowing its configuration (for scoring only).

        Raises:
            StoreNotFoundError: no ``meta.json`` at ``path``.
            StoreMismatchError: the store is incomplete.
            StoreFormatError, StoreCorruptError: as :meth:`open`.
        """
        path = Path(path)
        _check_path(path)
        meta = cls._read_meta(path)
        if meta is None:
            raise StoreNotFoundError(f"no hessfree store at {str(path)!r} (meta.json missing)")
        cls._check_format(path, meta)
        if not meta.get("complete"):
            raise StoreMismatchError(
                f"the store at {str(path)!r} is incomplete (a run stopped before finishing); "
                "call est.fit(train) with the training data to resume it"
            )
        store = cls(path, meta["config"], meta)
        store._check_files()
        return store

    @classmethod
    def _checked(cls, path: Path, meta: dict, config: dict) -> GradientStore:
        cls._check_format(path, meta)
        cls.check_config(path, meta.get("config", {}), config)
        store = cls(path, meta["config"], meta)
        if meta.get("state") != "allocating":
            store._check_files()
        return store

    @staticmethod
    def _read_meta(path: Path) -> dict | None:
        f = path / "meta.json"
        try:
            text = f.read_text()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            _check_path(path)
            raise
        except OSError as e:
            raise _os_error(e, path, "reading meta.json") from e
        try:
            meta = json.loads(text)
            if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
                raise ValueError("no config")
        except ValueError as e:
            raise StoreCorruptError(f"{str(f)!r} is not readable ({e}); the store is damaged: {_REBUILD}") from None
        return meta

    @staticmethod
    def _check_format(path: Path, meta: dict) -> None:
        fmt = meta.get("format", meta.get("config", {}).get("format"))
        if fmt != FORMAT:
            raise StoreFormatError(
                f"the store at {str(path)!r} was written by an earlier version of hessfree (store format {fmt}), "
                "which recorded neither a hash of all the training data nor the loss, so it cannot be checked "
                f"against your model and data; rebuild it: {_REBUILD}"
            )

    @staticmethod
    def check_config(path: str | os.PathLike, old: dict, new: dict) -> None:
        """Refuse a store configuration ``new`` that differs from the stored ``old``.

        Raises:
            StoreMismatchError: naming each differing key with both values, and the fix
                (a new store path, or delete the old store). Probe losses equal up to
                float rounding count as equal.
        """
        if "probe_loss" in old and "probe_loss" in new and _losses_match(old["probe_loss"], new["probe_loss"]):
            new = {**new, "probe_loss": old["probe_loss"]}  # equal up to float rounding
        check_settings(path, old, new, StoreMismatchError,
                       fix="use a new store path for this model, loss, data and configuration, or delete the old store")  # fmt: skip

    _compare = check_config  # the earlier name, kept for callers not yet moved

    @staticmethod
    def _check_fresh(path: Path) -> None:
        """A folder without ``meta.json`` is taken as a new store only when it holds
        nothing but what a run killed before its first ``meta.json`` leaves."""

        def leftover(p: Path) -> bool:
            name = p.name
            if name.startswith(".") and name.endswith(".tmp") or name == ".lock":
                return True
            if p.is_file() and (re.fullmatch(r"m\d+\.(features|sqnorm)", name) or name == "example.pt"):
                return True  # arrays reserved by a run killed before its meta.json (earlier versions wrote them first)
            if p.is_dir() and name == "progress":
                return all(q.name.startswith(".") and q.name.endswith(".tmp") for q in p.iterdir())
            return False

        try:
            others = sorted(p.name for p in path.iterdir() if not leftover(p))
        except OSError as e:
            raise _os_error(e, path, "listing the folder") from e
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise StoreMismatchError(
                f"{str(path)!r} exists and is not a hessfree store (no meta.json; it holds {shown}); "
                "pass an empty or new folder"
            )

    # ---- creating ------------------------------------------------------------------------
    def _files(self) -> list[tuple[str, int]]:
        """``(file name, size in bytes)`` of every array file."""
        out = []
        for m, dim in enumerate(self.dims):
            out.append((f"m{m}.features", self.n * dim * np.dtype(self._np_dtype).itemsize))
            out.append((f"m{m}.sqnorm", self.n * 8))
        return out

    def _write_meta(self, state: str, **extra: Any) -> None:
        meta = {"format": FORMAT, "config": self.config, "state": state, "complete": state == "complete", **extra}
        self._write_json(self.path / "meta.json", meta, "writing meta.json")
        self._meta = meta

    def _write_json(self, file: Path, obj: Any, doing: str) -> None:
        try:
            atomic_write_json(file, obj, indent=None)
        except OSError as e:
            raise _os_error(e, self.path, doing) from e

    def _create(self, example: Any) -> None:
        """meta.json (allocating) -> reserved files -> example.pt -> meta.json (writing)."""
        files = self._files()
        # progress records (~100 bytes per batch, assumed of 32 rows or more, and a temporary copy) and meta.json
        progress_bytes = 2 * 100 * math.ceil(self.n / 32) * len(self.dims) + 65536
        missing = 0
        for name, size in files:
            f = self.path / name
            have = f.stat().st_blocks * 512 if f.exists() and hasattr(os.stat_result, "st_blocks") else 0
            missing += max(0, size - have)
        needed = missing + progress_bytes
        free = _free_bytes(self.path)
        total = sum(size for _, size in files)
        if free is not None and needed > free:
            raise StoreFullError(
                f"not enough space for the store at {str(self.path)!r}: it needs {needed:,} bytes "
                f"({_human(needed)}: {len(self.dims)} member(s) x {self.n:,} rows, {_human(total)} of arrays, "
                f"and its records) but {free:,} bytes ({_human(free)}) are free there; free some space or pass "
                "another store path, then run est.fit(train) again"
            )
        self._write_meta("allocating")
        try:
            (self.path / "progress").mkdir(exist_ok=True)
            for name, size in files:
                _reserve(self.path / name, size)
        except OSError as e:
            free = _free_bytes(self.path)
            if e.errno in _FULL_ERRNOS:
                left = f"{free:,} bytes ({_human(free)}) are" if free is not None else "less is"
                raise StoreFullError(
                    f"not enough space for the store at {str(self.path)!r}: its arrays need {total:,} bytes "
                    f"({_human(total)}) but {left} free there; free some space or pass another store path, then "
                    "run est.fit(train) again"
                ) from e
            raise _os_error(e, self.path, "reserving the space of the arrays") from e
        if example is not None:
            try:
                atomic_save(self.path / "example.pt", example)
            except OSError as e:
                raise _os_error(e, self.path, "saving example.pt") from e
        self._write_meta("writing")

    def refresh(self) -> None:
        """Read ``meta.json`` and the progress files again (after another rank completed the store)."""
        meta = self._read_meta(self.path)
        if meta is None:
            raise StoreNotFoundError(f"no hessfree store at {str(self.path)!r} (meta.json missing)")
        self._meta = meta
        self._records_cache.clear()

    def release(self) -> None:
        """Release the writer's lock (a no-op for a store opened to read)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_files(self) -> None:
        for name, size in self._files():
            f = self.path / name
            try:
                have = f.stat().st_size
            except FileNotFoundError:
                raise StoreCorruptError(f"{str(f)!r} is missing from the store; {_REBUILD}") from None
            if have != size:
                raise StoreCorruptError(
                    f"{str(f)!r} has {have} bytes but should have {size} ({self.n} rows); the store is damaged "
                    f"(a truncated copy?): {_REBUILD}"
                )

    def _map(self, m: int, kind: str, mode: str, start: int = 0, stop: int | None = None) -> np.memmap:
        """A memmap of rows ``start:stop`` of one array. Maps are opened per call and
        dropped by the caller, so resident memory stays bounded by the rows touched
        in one call, not by the size of the store."""
        stop = self.n if stop is None else stop
        dim = self.dims[m] if kind == "features" else 1
        dtype = np.dtype(self._np_dtype if kind == "features" else np.float64)
        shape = (stop - start, dim) if kind == "features" else (stop - start,)
        offset = start * dim * dtype.itemsize
        f = self.path / f"m{m}.{kind}"
        need = offset + (stop - start) * dim * dtype.itemsize
        try:
            have = f.stat().st_size
        except FileNotFoundError:
            raise StoreCorruptError(f"{str(f)!r} is missing from the store; {_REBUILD}") from None
        if have < need:  # checked on every map: a shrunken file would crash the process on access
            raise StoreCorruptError(f"{str(f)!r} has {have} bytes but should have {self.n * dim * dtype.itemsize}; "
                                    f"the store is damaged: {_REBUILD}")  # fmt: skip
        return np.memmap(f, dtype=dtype, mode=mode, shape=shape, offset=offset)

    # ---- state ---------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        meta = self._read_meta(self.path)
        return bool(meta and meta.get("complete"))

    @property
    def data_hash(self) -> str | None:
        """The hash of all the training data (:func:`hessfree.data.combine_hashes`
        of the batch hashes), set when the store is complete."""
        return self._meta.get("data_hash")

    def records(self, m: int) -> list[tuple[int, int, str, int, int]]:
        """``(offset, count, data hash, features crc32, sqnorm crc32)`` of every batch of
        member ``m`` written and flushed (all ranks), by offset."""
        if m in self._records_cache:
            return self._records_cache[m]
        out: dict[tuple[int, int], tuple] = {}
        for f in sorted((self.path / "progress").glob(f"m{m}.r*.json")):
            try:
                rows = json.loads(f.read_text())
                recs = [(int(r[0]), int(r[1]), str(r[2]), int(r[3]), int(r[4])) for r in rows]
            except (ValueError, TypeError, IndexError) as e:
                raise StoreCorruptError(f"{str(f)!r} is not a readable progress file ({e}); {_REBUILD}") from None
            except OSError as e:
                raise _os_error(e, self.path, f"reading {f.name}") from e
            for r in recs:
                if out.setdefault(r[:2], r) != r:
                    raise StoreCorruptError(f"two progress files record rows {r[0]}-{r[0] + r[1] - 1} of member {m} "
                                            f"differently; {_REBUILD}")  # fmt: skip
        recs = sorted(out.values())
        if self._meta.get("complete"):
            self._records_cache[m] = recs
        return recs

    def done(self, m: int) -> set[tuple[int, int]]:
        """``{(offset, count)}`` batches of member ``m`` written and flushed (all ranks)."""
        return {r[:2] for r in self.records(m)}

    def rows_done(self, m: int) -> int:
        covered = np.zeros(self.n, dtype=bool)
        for o, c, *_ in self.records(m):
            covered[o : o + c] = True
        return int(covered.sum())

    def retain(self, batches: list[tuple[int, int]]) -> None:
        """Forget recorded batches that are not among ``batches`` (``(offset, count)``;
        a resume cut into other batches): their rows are written again."""
        keep = set(batches)
        for f in sorted((self.path / "progress").glob("m*.r*.json")):
            try:
                rows = json.loads(f.read_text())
                kept = [r for r in rows if (int(r[0]), int(r[1])) in keep]
            except (ValueError, TypeError, IndexError) as e:
                raise StoreCorruptError(f"{str(f)!r} is not a readable progress file ({e}); {_REBUILD}") from None
            if len(kept) != len(rows):
                self._write_json(f, kept, f"updating {f.name}")

    def mark_complete(self) -> str:
        """Set the complete flag, after checking that the batches of every member
        cover every row once and agree on each batch's data hash; record the
        hash of all the data. Returns that hash.

        Raises:
            StoreMismatchError: a batch was written from different data for two
                members (the data changed while the store was written).
        """
        recs = [self.records(m) for m in range(len(self.dims))]
        for m, rs in enumerate(recs):
            covered = np.zeros(self.n, dtype=np.int64)
            for o, c, *_ in rs:
                covered[o : o + c] += 1
            if (covered == 0).any():
                raise RuntimeError(f"store member {m} still misses {int((covered == 0).sum())} rows; not marking it complete")
            if (covered > 1).any():
                raise StoreCorruptError(f"member {m} of the store at {str(self.path)!r} records row "
                                        f"{int(np.argmax(covered > 1))} twice; {_REBUILD}")  # fmt: skip
        first = {r[:2]: r[2] for r in recs[0]}
        for m, rs in enumerate(recs[1:], start=1):
            for o, c, h, *_ in rs:
                if first.get((o, c)) != h:
                    raise StoreMismatchError(
                        f"the training data changed while the store at {str(self.path)!r} was written: rows "
                        f"{o}-{o + c - 1} hash differently for members 0 and {m} (data edited between runs, or a "
                        f"Dataset with random transforms); {_REBUILD}"
                    )
        digest = combine_hashes([r[:3] for r in recs[0]])
        self._write_meta("complete", data_hash=digest)
        self._records_cache.clear()
        return digest

    # ---- writing -------------------------------------------------------------------------
    def write(self, m: int, offset: int, feats: torch.Tensor, sqnorms: np.ndarray,
              data_hash: str = "") -> tuple[int, int, str, int, int]:  # fmt: skip
        """Write rows ``offset : offset + B`` of member ``m`` (fp32 in, stored dtype out) and flush.

        Returns:
            the batch's record ``(offset, count, data_hash, features crc32,
            sqnorm crc32)``, to pass to :meth:`record` once written.
        """
        x = feats.detach().float().cpu()
        if self.dtype == "bfloat16":
            arr = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
        else:
            arr = x.numpy().astype(self._np_dtype, copy=False)
        arr = np.ascontiguousarray(arr)
        sq = np.ascontiguousarray(sqnorms, dtype=np.float64)
        t = time.perf_counter()
        crcs = zlib.crc32(arr), zlib.crc32(sq)
        self.integrity_seconds += time.perf_counter() - t
        stop = offset + arr.shape[0]
        for kind, values in (("features", arr), ("sqnorm", sq)):
            mm = self._map(m, kind, "r+", offset, stop)
            try:
                mm[:] = values
                mm.flush()
            except OSError as e:
                raise _os_error(e, self.path, f"writing rows {offset}-{stop - 1} of m{m}.{kind}") from e
            finally:
                del mm
        return (int(offset), int(arr.shape[0]), str(data_hash), int(crcs[0]), int(crcs[1]))

    def record(self, m: int, rank: int, records: list[tuple]) -> None:
        """Atomically replace rank ``rank``'s progress list for member ``m`` (call after :meth:`write`)."""
        rows = sorted(tuple(r) for r in records)
        self._write_json(self.progress_file(m, rank), [list(r) for r in rows], "recording progress")

    def progress_file(self, m: int, rank: int) -> Path:
        """The file recording which batches rank ``rank`` wrote for member ``m``."""
        return self.path / "progress" / f"m{m}.r{rank}.json"

    def rank_records(self, m: int, rank: int) -> list[tuple[int, int, str, int, int]]:
        """The batches ``(offset, count, batch_hash, ...)`` recorded in rank ``rank``'s
        progress file of member ``m`` (empty when that rank has recorded none)."""
        f = self.progress_file(m, rank)
        if not f.exists():
            return []
        return [tuple(r) for r in json.loads(f.read_text())]

    def add_integrity_time(self, seconds: float) -> None:
        self.integrity_seconds += seconds

    # ---- reading -------------------------------------------------------------------------
    def _verified(self, m: int, kind: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of one array, read whole batches at a time, each checked
        against the crc32 recorded when it was written."""
        if stop <= start:
            return np.zeros((0, self.dims[m]) if kind == "features" else (0,), dtype=self._np_dtype if kind == "features" else np.float64)
        recs = self.records(m)
        offsets = [r[0] for r in recs]
        i = max(0, int(np.searchsorted(offsets, start, side="right")) - 1)
        inside = []
        while i < len(recs) and recs[i][0] < stop:
            if recs[i][0] + recs[i][1] > start:
                inside.append(recs[i])
            i += 1
        covered = sum(min(o + c, stop) - max(o, start) for o, c, *_ in inside)
        if covered != stop - start:
            raise StoreCorruptError(f"rows {start}-{stop - 1} of member {m} of the store at {str(self.path)!r} are "
                                    f"not all recorded as written; {_REBUILD}")  # fmt: skip
        lo, hi = min(start, inside[0][0]), max(stop, inside[-1][0] + inside[-1][1])
        mm = self._map(m, kind, "r", lo, hi)
        arr = np.array(mm)  # one copy off the map, then the map is dropped
        del mm
        t = time.perf_counter()
        for o, c, _, crc_f, crc_s in inside:
            if zlib.crc32(arr[o - lo : o - lo + c]) != (crc_f if kind == "features" else crc_s):
                raise StoreCorruptError(
                    f"{str(self.path / f'm{m}.{kind}')!r} rows {o}-{o + c - 1} no longer match the checksum "
                    f"recorded when they were written (damaged on disk or changed by another program); {_REBUILD}"
                )
        self.integrity_seconds += time.perf_counter() - t
        return arr[start - lo : stop - lo]

    def sqnorms(self) -> np.ndarray:
        """``(n_members, n)`` float64 squared feature norms (checksums verified)."""
        return np.stack([self._verified(m, "sqnorm", 0, self.n) for m in range(len(self.dims))])

    def rows(self, m: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of member ``m`` as an fp32 tensor ``(stop-start, dim_m)`` (checksums verified)."""
        t = torch.from_numpy(np.ascontiguousarray(self._verified(m, "features", start, stop)))
        if self.dtype == "bfloat16":
            return t.view(torch.int16).view(torch.bfloat16).float()
        return t.float()

    def blocks(self, m: int, start: int, stop: int, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, (b, dim_m) fp32)`` blocks covering rows ``start:stop``."""
        for s in range(start, stop, block_rows):
            yield s, self.rows(m, s, min(s + block_rows, stop))


__all__ = [
    "GradientStore",
    "StoreCorruptError",
    "StoreError",
    "StoreFormatError",
    "StoreFullError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "fingerprint_data",
    "fingerprint_tensors",
]
