"""Reading a store's arrays: memory maps of row ranges (for writing), and reads verified
against the crc32 checksums recorded when each batch was written.

A verified read maps the file privately (``np.memmap`` in copy-on-write mode: no
copy of the rows, and nothing written to a block reaches the file) and checks every
recorded batch a block covers against its crc32, on the mapped bytes, before the block
is handed out; a file changed since it was written is found on the next read. The
batches of a block are checked in parallel threads (the checksum releases the GIL), and
:meth:`ArrayFile.stream` checks block ``i + 1`` while the caller multiplies block ``i``.
Not detected: a program that rewrites a complete store's file while a read is under way
(hessfree never writes a complete store).
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

TASK_BYTES = 1 << 20  # consecutive small batches are checked together, about this many bytes a task
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The checksum threads (made again in a forked child, whose copy has no threads)."""
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

    def _missing(self) -> StoreCorruptError:
        return StoreCorruptError(f"{str(self.path)!r} is missing from the store; {REBUILD}")

    def _check_size(self, need: int, have: int | None = None, exact: bool = False) -> None:
        """Refuse a file shorter than ``need`` bytes (with ``exact``: of another size);
        ``have`` is its size when already known (else the file is looked up)."""
        if have is None:
            try:
                have = self.path.stat().st_size
            except FileNotFoundError:
                raise self._missing() from None
        if have < need or (exact and have != need):  # checked on every access: a short file would crash a memory map
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

    def _check(self, raw: memoryview, lo: int, group: list[tuple]) -> float:
        """Compare each recorded batch of ``group`` with the crc32 of its bytes in ``raw``
        (the file's rows from ``lo``); the seconds spent."""
        t = time.perf_counter()
        for rec in group:
            o, c = rec[0], rec[1]
            if crc32(raw[(o - lo) * self.row_bytes : (o - lo + c) * self.row_bytes]) != rec[self.crc_field]:
                raise StoreCorruptError(
                    f"{str(self.path)!r} rows {o}-{o + c - 1} no longer match the checksum "
                    f"recorded when they were written (damaged on disk or changed by another program); {REBUILD}"
                )
        return time.perf_counter() - t

    def _rows_of(self, f, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of the open file ``f``: a private memory map (copy-on-write: blocks are
        writable arrays, and the file never changes through them), or a copy read into memory
        where the file system cannot map files."""
        shape = (hi - lo, *self.shape_of_rows)
        try:
            return np.memmap(f, dtype=self.dtype, mode="c", shape=shape, offset=lo * self.row_bytes)
        except (OSError, ValueError):  # e.g. a file system without mmap: read below
            pass
        rows = np.empty(shape, dtype=self.dtype)
        raw = memoryview(rows.reshape(-1).view(np.uint8))
        f.seek(lo * self.row_bytes)
        got = 0
        while got < len(raw):
            n = f.readinto(raw[got:])
            if not n:
                raise StoreCorruptError(f"{str(self.path)!r} ends before row {hi}; the store is damaged: {REBUILD}")
            got += n
        return rows

    def _start(self, f, records: list[tuple], start: int, stop: int, what: str, skip: set[tuple]):
        """Map the whole recorded batches that cover rows ``start:stop`` (a private map of
        the open file ``f``) and start checking those not in ``skip`` (which they join);
        ``(map, lo, tasks)``: the rows from ``lo``, and ``(future, batches)`` per task."""
        inside = self.covering(records, start, stop, what)
        lo, hi = min(start, inside[0][0]), max(stop, inside[-1][0] + inside[-1][1])
        rows = self._rows_of(f, lo, hi)
        raw = memoryview(np.asarray(rows).reshape(-1).view(np.uint8))
        groups, size = [[]], 0
        for rec in inside:
            if rec in skip:
                continue
            skip.add(rec)
            if size >= TASK_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(rec)
            size += rec[1] * self.row_bytes
        pool = _executor()
        return rows, lo, [(pool.submit(self._check, raw, lo, g), g) for g in groups if g]

    @staticmethod
    def _finish(tasks: list[tuple[Future, list[tuple]]], done: set[tuple]) -> float:
        wait([f for f, _ in tasks])
        seconds = sum(f.result() for f, _ in tasks)  # raises the first worker's error
        for _, group in tasks:
            done.update(group)
        return seconds

    def stream(self, records: list[tuple], start: int, stop: int, block_rows: int, what: str,
               checked: dict[str, tuple] | None = None) -> Iterator[tuple[int, np.ndarray, float]]:  # fmt: skip
        """``(offset, rows, checksum seconds)`` for blocks of ``block_rows`` rows covering
        ``start:stop``. Each block is a view of a private memory map of its rows (no copy;
        writing to it never changes the file; resident memory is what the caller keeps) and
        stays valid after the next step. Every recorded batch a block covers is checked
        against its crc32 before the block is handed out; the next block is checked while
        the caller uses this one.

        ``checked`` (the caller's, kept between reads) remembers the batches found sound
        while the file's identity (device, inode, size, modification and change times)
        stays the same; they are not checked again. A file changed in any of these is
        checked again in full.

        Raises:
            StoreCorruptError: a missing file or one of another size, rows not recorded as
                written, or a batch that no longer matches its checksum.
        """
        if stop <= start:
            return
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise self._missing() from None
        with f:
            st = os.fstat(f.fileno())  # the identity of exactly the file that is mapped
            self._check_size(self.n * self.row_bytes, have=st.st_size, exact=True)
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = checked.get(str(self.path)) if checked is not None else None
            done: set[tuple] = known[1] if known is not None and known[0] == identity else set()
            if checked is not None:
                checked[str(self.path)] = (identity, done)
            bounds = [(s, min(s + block_rows, stop)) for s in range(start, stop, block_rows)]
            submitted = set(done)
            pending = self._start(f, records, *bounds[0], what, submitted)
            try:
                for i, (s, e) in enumerate(bounds):
                    rows, lo, tasks = pending
                    pending = self._start(f, records, *bounds[i + 1], what, submitted) if i + 1 < len(bounds) else None
                    seconds = self._finish(tasks, done)
                    yield s, rows[s - lo : e - lo], seconds
            finally:
                if pending is not None:
                    wait([t for t, _ in pending[2]])  # no checker left running when the caller stops early

    def verified(self, records: list[tuple], start: int, stop: int, what: str,
                 checked: dict[str, tuple] | None = None) -> tuple[np.ndarray, float]:  # fmt: skip
        """Rows ``start:stop`` (a view of a private memory map), every recorded batch they
        cover checked against its crc32 (see :meth:`stream` for ``checked``); and the
        seconds spent on checksums."""
        if stop <= start:
            return np.zeros((0, *self.shape_of_rows), dtype=self.dtype), 0.0
        for _, rows, seconds in self.stream(records, start, stop, stop - start, what, checked):
            return rows, seconds
        raise AssertionError("unreachable")  # pragma: no cover
