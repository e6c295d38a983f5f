"""GradientStore: the folder of per-member feature arrays (see :mod:`hessfree.store`)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_save, atomic_write_json, check_settings
from ..data import combine_hashes
from ._files import _check_path, _Lock, check_sizes, check_space, os_error, reserve_all
from ._meta import FORMAT, check_format, check_fresh, read_meta
from ._read import ArrayFile, crc32
from .errors import (
    REBUILD,
    StoreCorruptError,
    StoreMismatchError,
    StoreNotFoundError,
)
from .fingerprints import losses_match

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


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
        self._sound: dict[str, tuple] = {}  # per file: (identity, batches found sound), see ArrayFile.stream
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
        meta = read_meta(path)
        if meta is not None and (meta.get("complete") or not create):
            return cls._checked(path, meta, config)
        if not create:
            raise StoreNotFoundError(f"no store at {str(path)!r}")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, path, "creating the folder") from e
        lock = _Lock(path)
        lock.acquire()
        try:
            meta = read_meta(path)  # again, now that no other writer can change it
            if meta is not None:
                store = cls._checked(path, meta, config)
                if meta.get("state") == "allocating":
                    store._create(example)
            else:
                check_fresh(path)
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
        meta = read_meta(path)
        if meta is None:
            raise StoreNotFoundError(f"no hessfree store at {str(path)!r} (meta.json missing)")
        check_format(path, meta)
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
        check_format(path, meta)
        cls.check_config(path, meta.get("config", {}), config)
        store = cls(path, meta["config"], meta)
        if meta.get("state") != "allocating":
            store._check_files()
        return store

    @staticmethod
    def check_config(path: str | os.PathLike, old: dict, new: dict) -> None:
        """Refuse a store configuration ``new`` that differs from the stored ``old``.

        Raises:
            StoreMismatchError: naming each differing key with both values, and the fix
                (a new store path, or delete the old store). Probe losses equal up to
                float rounding count as equal.
        """
        if "probe_loss" in old and "probe_loss" in new and losses_match(old["probe_loss"], new["probe_loss"]):
            new = {**new, "probe_loss": old["probe_loss"]}  # equal up to float rounding
        check_settings(path, old, new, StoreMismatchError,
                       fix="use a new store path for this model, loss, data and configuration, or delete the old store")  # fmt: skip


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
            raise os_error(e, self.path, doing) from e

    def _create(self, example: Any) -> None:
        """meta.json (allocating) -> reserved files -> example.pt -> meta.json (writing)."""
        files = self._files()
        # progress records (~100 bytes per batch, assumed of 32 rows or more, and a temporary copy) and meta.json
        progress_bytes = 2 * 100 * math.ceil(self.n / 32) * len(self.dims) + 65536
        shape = f"{len(self.dims)} member(s) x {self.n:,} rows"
        check_space(self.path, files, progress_bytes, shape)
        self._write_meta("allocating")
        reserve_all(self.path, files)
        if example is not None:
            try:
                atomic_save(self.path / "example.pt", example)
            except OSError as e:
                raise os_error(e, self.path, "saving example.pt") from e
        self._write_meta("writing")

    def refresh(self) -> None:
        """Read ``meta.json`` and the progress files again (after another rank completed the store)."""
        meta = read_meta(self.path)
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
        check_sizes(self.path, self._files(), self.n)

    def _file(self, m: int, kind: str) -> ArrayFile:
        """Member ``m``'s array of ``kind`` ``"features"`` (n, dim_m) or ``"sqnorm"`` (n,)."""
        if kind == "features":
            return ArrayFile(self.path / f"m{m}.features", self.n, self.dims[m], np.dtype(self._np_dtype), 3)
        return ArrayFile(self.path / f"m{m}.sqnorm", self.n, 1, np.dtype(np.float64), 4)

    # ---- state ---------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        meta = read_meta(self.path)
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
                raise StoreCorruptError(f"{str(f)!r} is not a readable progress file ({e}); {REBUILD}") from None
            except OSError as e:
                raise os_error(e, self.path, f"reading {f.name}") from e
            for r in recs:
                if out.setdefault(r[:2], r) != r:
                    raise StoreCorruptError(f"two progress files record rows {r[0]}-{r[0] + r[1] - 1} of member {m} "
                                            f"differently; {REBUILD}")  # fmt: skip
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
                raise StoreCorruptError(f"{str(f)!r} is not a readable progress file ({e}); {REBUILD}") from None
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
                                        f"{int(np.argmax(covered > 1))} twice; {REBUILD}")  # fmt: skip
        first = {r[:2]: r[2] for r in recs[0]}
        for m, rs in enumerate(recs[1:], start=1):
            for o, c, h, *_ in rs:
                if first.get((o, c)) != h:
                    raise StoreMismatchError(
                        f"the training data changed while the store at {str(self.path)!r} was written: rows "
                        f"{o}-{o + c - 1} hash differently for members 0 and {m} (data edited between runs, or a "
                        f"Dataset with random transforms); {REBUILD}"
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
        self._sound.clear()  # rows change: every later read checks again
        t = time.perf_counter()
        crcs = crc32(arr), crc32(sq)
        self.integrity_seconds += time.perf_counter() - t
        stop = offset + arr.shape[0]
        for kind, values in (("features", arr), ("sqnorm", sq)):
            mm = self._file(m, kind).map("r+", offset, stop)
            try:
                mm[:] = values
                mm.flush()
            except OSError as e:
                raise os_error(e, self.path, f"writing rows {offset}-{stop - 1} of m{m}.{kind}") from e
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
        """Rows ``start:stop`` of one array, each batch checked against its recorded crc32."""
        arr, seconds = self._file(m, kind).verified(self.records(m), start, stop, f"member {m}", self._sound)
        self.integrity_seconds += seconds
        return arr

    def sqnorms(self) -> np.ndarray:
        """``(n_members, n)`` float64 squared feature norms (checksums verified)."""
        return np.stack([self._verified(m, "sqnorm", 0, self.n) for m in range(len(self.dims))])

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        """Stored rows as fp32 (no copy for an fp32 store)."""
        t = torch.from_numpy(arr)
        if self.dtype == "bfloat16":
            return t.view(torch.int16).view(torch.bfloat16).float()
        return t.float()

    def rows(self, m: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of member ``m`` as an fp32 tensor ``(stop-start, dim_m)`` (checksums verified),
        a copy of its own: later changes to the file never reach it."""
        t = self._tensor(self._verified(m, "features", start, stop))
        return t.clone() if self.dtype == "float32" else t  # half precision: converting already copied

    def blocks(self, m: int, start: int, stop: int, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, (b, dim_m) fp32)`` blocks covering rows ``start:stop``, each verified
        against the checksums of the batches it covers; the next block is checked while the
        caller uses this one. An fp32 block is a view of the file's memory map (no copy), for
        immediate use: a program that rewrites or truncates the file afterwards changes it, or
        makes reading it fail with SIGBUS (hessfree never writes a complete store)."""
        stream = self._file(m, "features").stream(self.records(m), start, stop, block_rows, f"member {m}", self._sound)
        for s, arr, seconds in stream:
            self.integrity_seconds += seconds
            yield s, self._tensor(arr)
