"""Reading a store's arrays: memory maps of row ranges (for writing), and reads verified
against the crc32 checksums recorded when each batch was written.

A verified read fills a fresh buffer straight from the file (``os.preadv``, no memory
map and no second copy) and checks each recorded batch's crc32 on exactly the bytes it
returns, so a changed file can never hand out unverified rows. The batches of a block
are read and checked in parallel threads (``preadv`` and the checksum release the GIL),
and :meth:`ArrayFile.stream` reads block ``i + 1`` while the caller multiplies block ``i``.
The checksum is CRC-32 as ``zlib.crc32`` defines it, computed by ``isal`` (Intel's
ISA-L, about ten times zlib's speed) where it is installed, else by ``zlib``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import REBUILD, StoreCorruptError

try:  # the same CRC-32 as zlib's, with the processor's carry-less multiply (about 10x faster)
    from isal.isal_zlib import crc32
except ImportError:  # zlib gives the same values, slower
    from zlib import crc32

TASK_BYTES = 1 << 20  # consecutive small batches are read and checked together, about this many bytes a task
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The reader threads (made again in a forked child, whose copy has no threads)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="hessfree-read")
            _pool_pid = os.getpid()
        return _pool


def _forget_pool_in_child() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # the parent's threads and lock state do not carry over


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _read_into(fd: int, path: Path, view: memoryview, pos: int) -> bool:
    """Fill ``view`` with the file's bytes from ``pos``; ``False`` when the file ends first."""
    done = 0
    if hasattr(os, "preadv"):
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got == 0:
                return False
            done += got
        return True
    with open(path, "rb", buffering=0) as f:  # no positional reads here: a file object per task
        f.seek(pos)
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                return False
            done += got
    return True


@dataclass(frozen=True)
class ArrayFile:
    """One array file of a store: ``(n, dim)`` rows of ``dtype`` (``dim`` 1 is a vector).

    ``crc_field`` is the position, in a progress record ``(offset, count, data hash,
    features crc32, sqnorm crc32)``, of this file's checksum.
    """

    path: Path
    n: int
    dim: int
    dtype: np.dtype
    crc_field: int

    @property
    def shape_of_rows(self) -> tuple[int, ...]:
        return (self.dim,) if self.crc_field == 3 else ()

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def _check_size(self, need: int) -> None:
        try:
            have = self.path.stat().st_size
        except FileNotFoundError:
            raise StoreCorruptError(f"{str(self.path)!r} is missing from the store; {REBUILD}") from None
        if have < need:  # checked on every access: a shrunken file would crash a memory map
            raise StoreCorruptError(f"{str(self.path)!r} has {have} bytes but should have {self.n * self.row_bytes}; "
                                    f"the store is damaged: {REBUILD}")  # fmt: skip

    def map(self, mode: str, start: int = 0, stop: int | None = None) -> np.memmap:
        """A memmap of rows ``start:stop``. Maps are opened per call and dropped by the
        caller, so resident memory stays bounded by the rows touched in one call, not
        by the size of the store.

        Raises:
            StoreCorruptError: the file is missing or shorter than its rows need.
        """
        stop = self.n if stop is None else stop
        self._check_size(stop * self.row_bytes)
        shape = (stop - start, *self.shape_of_rows)
        return np.memmap(self.path, dtype=self.dtype, mode=mode, shape=shape, offset=start * self.row_bytes)

    def covering(self, records: list[tuple], start: int, stop: int, what: str) -> list[tuple]:
        """The recorded batches that overlap rows ``start:stop`` (``records`` sorted by offset).

        Raises:
            StoreCorruptError: some row in the range is not recorded as written.
        """
        offsets = [r[0] for r in records]
        i = max(0, int(np.searchsorted(offsets, start, side="right")) - 1)
        inside = []
        while i < len(records) and records[i][0] < stop:
            if records[i][0] + records[i][1] > start:
                inside.append(records[i])
            i += 1
        covered = sum(min(o + c, stop) - max(o, start) for o, c, *_ in inside)
        if covered != stop - start:
            raise StoreCorruptError(f"rows {start}-{stop - 1} of {what} of the store at {str(self.path.parent)!r} are "
                                    f"not all recorded as written; {REBUILD}")  # fmt: skip
        return inside

    def _read_checked(self, fd: int, raw: memoryview, lo: int, group: list[tuple]) -> float:
        """Read the consecutive batches ``group`` into their place in ``raw`` (bytes of rows
        from ``lo``) and compare each with its crc32; the seconds spent on checksums."""
        first, last = group[0][0], group[-1][0] + group[-1][1]
        view = raw[(first - lo) * self.row_bytes : (last - lo) * self.row_bytes]
        if not _read_into(fd, self.path, view, first * self.row_bytes):
            raise StoreCorruptError(f"{str(self.path)!r} ends before row {last}; the store is damaged: {REBUILD}")
        t = time.perf_counter()
        for rec in group:
            o, c = rec[0], rec[1]
            if crc32(raw[(o - lo) * self.row_bytes : (o - lo + c) * self.row_bytes]) != rec[self.crc_field]:
                raise StoreCorruptError(
                    f"{str(self.path)!r} rows {o}-{o + c - 1} no longer match the checksum "
                    f"recorded when they were written (damaged on disk or changed by another program); {REBUILD}"
                )
        return time.perf_counter() - t

    def _start(self, fd: int, records: list[tuple], start: int, stop: int, what: str):
        """Start reading rows ``start:stop`` (whole recorded batches) into a fresh buffer;
        returns ``(buffer, lo, futures)``: the rows from ``lo``, once every future is done."""
        inside = self.covering(records, start, stop, what)
        lo, hi = min(start, inside[0][0]), max(stop, inside[-1][0] + inside[-1][1])
        buf = np.empty((hi - lo, *self.shape_of_rows), dtype=self.dtype)
        raw = memoryview(buf.reshape(-1).view(np.uint8))
        groups, size = [[]], 0
        for rec in inside:
            if size >= TASK_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(rec)
            size += rec[1] * self.row_bytes
        pool = _executor()
        return buf, lo, [pool.submit(self._read_checked, fd, raw, lo, g) for g in groups]

    @staticmethod
    def _finish(futures: list[Future]) -> float:
        wait(futures)
        return sum(f.result() for f in futures)  # raises the first worker's error

    def stream(self, records: list[tuple], start: int, stop: int, block_rows: int,
               what: str) -> Iterator[tuple[int, np.ndarray, float]]:  # fmt: skip
        """``(offset, rows, checksum seconds)`` for blocks of ``block_rows`` rows covering
        ``start:stop``, each verified; the next block is read while the caller uses this
        one. Each block is a new array (it stays valid after the next step).

        Raises:
            StoreCorruptError: a missing or short file, rows not recorded as written, or
                a batch that no longer matches its checksum.
        """
        if stop <= start:
            return
        self._check_size(self.n * self.row_bytes)
        bounds = [(s, min(s + block_rows, stop)) for s in range(start, stop, block_rows)]
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        pending: list[Future] = []
        nxt = None
        try:
            nxt = self._start(fd, records, *bounds[0], what)
            for i, (s, e) in enumerate(bounds):
                buf, lo, pending = nxt
                nxt = self._start(fd, records, *bounds[i + 1], what) if i + 1 < len(bounds) else None
                seconds = self._finish(pending)
                yield s, buf[s - lo : e - lo], seconds
            pending = []
        finally:
            wait(pending + (nxt[2] if nxt is not None else []))  # no reader left on the closed descriptor
            os.close(fd)

    def verified(self, records: list[tuple], start: int, stop: int, what: str) -> tuple[np.ndarray, float]:
        """Rows ``start:stop``, read whole recorded batches at a time, each checked against
        its crc32; and the seconds spent on checksums."""
        if stop <= start:
            return np.zeros((0, *self.shape_of_rows), dtype=self.dtype), 0.0
        for _, rows, seconds in self.stream(records, start, stop, stop - start, what):
            return rows, seconds
        raise AssertionError("unreachable")  # pragma: no cover
