"""Reading a store's arrays: memory maps of row ranges and reads verified against the
crc32 checksums recorded when each batch was written."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import REBUILD, StoreCorruptError


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

    def map(self, mode: str, start: int = 0, stop: int | None = None) -> np.memmap:
        """A memmap of rows ``start:stop``. Maps are opened per call and dropped by the
        caller, so resident memory stays bounded by the rows touched in one call, not
        by the size of the store.

        Raises:
            StoreCorruptError: the file is missing or shorter than its rows need.
        """
        stop = self.n if stop is None else stop
        shape = (stop - start, *self.shape_of_rows)
        itemsize = self.dim * self.dtype.itemsize
        offset = start * itemsize
        need = offset + (stop - start) * itemsize
        try:
            have = self.path.stat().st_size
        except FileNotFoundError:
            raise StoreCorruptError(f"{str(self.path)!r} is missing from the store; {REBUILD}") from None
        if have < need:  # checked on every map: a shrunken file would crash the process on access
            raise StoreCorruptError(f"{str(self.path)!r} has {have} bytes but should have {self.n * itemsize}; "
                                    f"the store is damaged: {REBUILD}")  # fmt: skip
        return np.memmap(self.path, dtype=self.dtype, mode=mode, shape=shape, offset=offset)

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

    def check(self, arr: np.ndarray, lo: int, inside: list[tuple]) -> None:
        """Compare each batch of ``inside`` with its crc32; ``arr`` holds rows from ``lo``.

        Raises:
            StoreCorruptError: a batch's bytes no longer match its checksum.
        """
        for rec in inside:
            o, c = rec[0], rec[1]
            if zlib.crc32(arr[o - lo : o - lo + c]) != rec[self.crc_field]:
                raise StoreCorruptError(
                    f"{str(self.path)!r} rows {o}-{o + c - 1} no longer match the checksum "
                    f"recorded when they were written (damaged on disk or changed by another program); {REBUILD}"
                )

    def verified(self, records: list[tuple], start: int, stop: int, what: str) -> tuple[np.ndarray, float]:
        """Rows ``start:stop``, read whole recorded batches at a time, each checked against
        its crc32; and the seconds spent on checksums."""
        if stop <= start:
            return np.zeros((0, *self.shape_of_rows), dtype=self.dtype), 0.0
        inside = self.covering(records, start, stop, what)
        lo, hi = min(start, inside[0][0]), max(stop, inside[-1][0] + inside[-1][1])
        mm = self.map("r", lo, hi)
        arr = np.array(mm)  # one copy off the map, then the map is dropped
        del mm
        t = time.perf_counter()
        self.check(arr, lo, inside)
        return arr[start - lo : stop - lo], time.perf_counter() - t
