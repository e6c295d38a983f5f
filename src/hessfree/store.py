"""On-disk store of per-example training features (projected gradients), one per member.

Layout of a store folder::

    meta.json              configuration + fingerprints; "complete": true is written last
    m{m}.features          (n, dim_m) raw array (numpy memmap), fp32 / fp16 / bf16
    m{m}.sqnorm            (n,) float64 squared feature norms (computed in fp32 before rounding)
    example.pt             the first training example (to rebuild members without the data)
    progress/m{m}.r{r}.json  row ranges [offset, count] that rank r has written and flushed

Crash safety: rows are written to the memmap and flushed *before* their range
is added to the rank's progress file (replaced atomically), and the
``complete`` flag is set only after every row of every member is covered. A
run killed at any point therefore resumes from the last recorded batch and
gives the same arrays as an uninterrupted run, and a half-written store is
never taken for a complete one.

Reopening a store with a different model, parameter selection, projection,
member set, storage dtype or training data raises :class:`StoreMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class StoreMismatchError(ValueError):
    """The store on disk was written with a different model, data or configuration."""


# ---- fingerprints ---------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint_tensors(named: dict[str, torch.Tensor]) -> str:
    """Hash of names, shapes, dtypes and values of a dict of tensors."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(named):
        t = named[k]
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _hash_item(h, item: Any) -> None:
    if isinstance(item, torch.Tensor):
        h.update(f"T{tuple(item.shape)}{item.dtype}".encode())
        h.update(_tensor_bytes(item))
    elif isinstance(item, np.ndarray):
        _hash_item(h, torch.from_numpy(np.ascontiguousarray(item)))
    elif isinstance(item, dict):
        for k in sorted(item):
            h.update(str(k).encode())
            _hash_item(h, item[k])
    elif isinstance(item, (list, tuple)):
        for v in item:
            _hash_item(h, v)
    else:
        h.update(repr(item).encode())


def fingerprint_data(source, samples: int = 64) -> str:
    """Hash of the size and of ``samples`` evenly spaced examples of a DataSource.

    A sample, not the whole set, so that checking a store stays cheap for any
    data size; it catches a different split, order or size.
    """
    from .data import slice_batch

    n = source.n
    idx = sorted({int(i) for i in np.linspace(0, n - 1, num=min(samples, n))})
    h = hashlib.blake2b(digest_size=16)
    h.update(f"n={n}".encode())
    if source._tensors is not None:
        for i in idx:
            _hash_item(h, slice_batch(source._tensors, i, i + 1))
    else:
        dataset = source._loader.dataset
        for i in idx:
            _hash_item(h, dataset[i])
    return h.hexdigest()


# ---- the store -----------------------------------------------------------------------------


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class GradientStore:
    """A folder of per-member feature arrays (see the module docstring).

    Open with :meth:`open`; the estimator does this for ``hf.Influence(store=path)``.

    Attributes:
        path: the folder.
        config: the configuration it was written with.
        n: number of training examples (rows).
        dims: feature dimension of each member.
    """

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path, self.config = path, config
        self.n = int(config["n"])
        self.dims = [int(d) for d in config["dims"]]
        self.dtype = config["dtype"]
        self._np_dtype = DTYPES[self.dtype]

    # ---- opening --------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, config: dict[str, Any], create: bool = True) -> GradientStore:
        """Open the store at ``path`` for ``config``, creating it when absent.

        Only one process (rank 0) should create a store; others call this after a barrier.

        Raises:
            StoreMismatchError: the folder holds a store written with another configuration.
        """
        path = Path(path)
        if config.get("dtype") not in DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {config.get('dtype')!r}")
        meta_path = path / "meta.json"
        config = {**config, "format": FORMAT}
        if meta_path.exists():
            with open(meta_path) as f:
                meta = json.load(f)
            cls._compare(path, meta.get("config", {}), config)
            return cls(path, config)
        if path.exists() and any(path.iterdir()):
            raise StoreMismatchError(
                f"{str(path)!r} exists and is not a hessfree store (no meta.json); pass an empty or new folder"
            )
        if not create:
            raise FileNotFoundError(f"no store at {str(path)!r}")
        (path / "progress").mkdir(parents=True, exist_ok=True)
        store = cls(path, config)
        for m in range(len(store.dims)):
            store._allocate(m)
        _atomic_write_json(meta_path, {"config": config, "complete": False})
        return store

    @classmethod
    def open_existing(cls, path: str | os.PathLike) -> GradientStore:
        """Open a complete store without knowing its configuration (for scoring only)."""
        meta_path = Path(path) / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no hessfree store at {str(path)!r} (meta.json missing)")
        with open(meta_path) as f:
            meta = json.load(f)
        store = cls(Path(path), meta["config"])
        if not meta.get("complete"):
            raise StoreMismatchError(
                f"the store at {str(path)!r} is incomplete (a run stopped before finishing); "
                "call est.fit(train) with the training data to resume it"
            )
        return store

    @staticmethod
    def _compare(path: Path, old: dict, new: dict) -> None:
        keys = sorted(set(old) | set(new))
        diff = [k for k in keys if old.get(k) != new.get(k)]
        if diff:
            detail = "; ".join(f"{k}: stored {_short(old.get(k))} vs now {_short(new.get(k))}" for k in diff[:4])
            raise StoreMismatchError(
                f"the store at {str(path)!r} was written with a different configuration ({detail}). "
                "Use a new store path for this model/data/configuration, or delete the old store."
            )

    def _allocate(self, m: int) -> None:
        """Create the raw (headerless) files; their shape and dtype live in meta.json."""
        for kind, shape, dtype in (("features", (self.n, self.dims[m]), self._np_dtype), ("sqnorm", (self.n,), np.float64)):
            f = self.path / f"m{m}.{kind}"
            mm = np.memmap(f, dtype=dtype, mode="w+", shape=shape)
            mm.flush()
            del mm

    def _map(self, m: int, kind: str, mode: str, start: int = 0, stop: int | None = None) -> np.memmap:
        """A memmap of rows ``start:stop`` of one array. Maps are opened per call and
        dropped by the caller, so resident memory stays bounded by the rows touched
        in one call, not by the size of the store."""
        stop = self.n if stop is None else stop
        dim = self.dims[m] if kind == "features" else 1
        dtype = np.dtype(self._np_dtype if kind == "features" else np.float64)
        shape = (stop - start, dim) if kind == "features" else (stop - start,)
        offset = start * dim * dtype.itemsize
        return np.memmap(self.path / f"m{m}.{kind}", dtype=dtype, mode=mode, shape=shape, offset=offset)

    # ---- state ---------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        with open(self.path / "meta.json") as f:
            return bool(json.load(f).get("complete"))

    def mark_complete(self) -> None:
        """Set the complete flag, after checking that every row of every member is written."""
        for m in range(len(self.dims)):
            missing = self.n - self.rows_done(m)
            if missing:
                raise RuntimeError(f"store member {m} still misses {missing} rows; not marking it complete")
        _atomic_write_json(self.path / "meta.json", {"config": self.config, "complete": True})

    def done(self, m: int) -> set[tuple[int, int]]:
        """``{(offset, count)}`` batches of member ``m`` written and flushed (all ranks)."""
        out: set[tuple[int, int]] = set()
        for f in (self.path / "progress").glob(f"m{m}.r*.json"):
            with open(f) as fh:
                out.update((int(o), int(c)) for o, c in json.load(fh))
        return out

    def rows_done(self, m: int) -> int:
        covered = np.zeros(self.n, dtype=bool)
        for o, c in self.done(m):
            covered[o : o + c] = True
        return int(covered.sum())

    # ---- writing -------------------------------------------------------------------------
    def write(self, m: int, offset: int, feats: torch.Tensor, sqnorms: np.ndarray) -> None:
        """Write rows ``offset : offset + B`` of member ``m`` (fp32 in, stored dtype out) and flush."""
        x = feats.detach().float().cpu()
        if self.dtype == "bfloat16":
            arr = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
        else:
            arr = x.numpy().astype(self._np_dtype, copy=False)
        stop = offset + arr.shape[0]
        for kind, values in (("features", arr), ("sqnorm", sqnorms)):
            mm = self._map(m, kind, "r+", offset, stop)
            mm[:] = values
            mm.flush()
            del mm

    def record(self, m: int, rank: int, ranges: list[tuple[int, int]]) -> None:
        """Atomically replace rank ``rank``'s progress list for member ``m`` (call after :meth:`write`)."""
        _atomic_write_json(self.path / "progress" / f"m{m}.r{rank}.json", sorted(ranges))

    # ---- reading -------------------------------------------------------------------------
    def sqnorms(self) -> np.ndarray:
        """``(n_members, n)`` float64 squared feature norms."""
        return np.stack([np.array(self._map(m, "sqnorm", "r")) for m in range(len(self.dims))])

    def rows(self, m: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of member ``m`` as an fp32 tensor ``(stop-start, dim_m)``."""
        mm = self._map(m, "features", "r", start, stop)
        t = torch.from_numpy(np.array(mm))  # one copy off the map, then the map is dropped
        del mm
        if self.dtype == "bfloat16":
            return t.view(torch.int16).view(torch.bfloat16).float()
        return t.float()

    def blocks(self, m: int, start: int, stop: int, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, (b, dim_m) fp32)`` blocks covering rows ``start:stop``."""
        for s in range(start, stop, block_rows):
            yield s, self.rows(m, s, min(s + block_rows, stop))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
