"""The estimator's scale-out parts: the on-disk store, sharding over ranks, top-k.

Kept apart from :mod:`hessfree.influence` so the estimator reads as the math;
:class:`hessfree.Influence` inherits these methods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .data import DataSource, batch_size_of, slice_batch, to_device
from .distributed import RankFailedError, all_gather, barrier, rank_and_world
from .scoring import merge_top_k, top_k_blocked
from .store import DTYPES, GradientStore, StoreMismatchError, fingerprint_data, fingerprint_tensors


class TopK(NamedTuple):
    """Result of :meth:`hessfree.Influence.top_k`.

    Attributes:
        indices: ``(n_test, k)`` training-row indices, best first.
        scores: ``(n_test, k)`` their pairwise scores (same units as ``pairwise``).
    """

    indices: np.ndarray
    scores: np.ndarray


class StoreMixin:
    score_block_rows: int = 8192
    """Training rows per block when scoring from a store (memory ~ block x dim x 4 bytes)."""

    # ---- arguments ---------------------------------------------------------------------
    @staticmethod
    def _check_store_args(store: Any, dtype: str) -> tuple[Path | None, str]:
        if dtype not in DTYPES:
            raise ValueError(f"store_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if store is None:
            return None, dtype
        if not isinstance(store, (str, os.PathLike)):
            raise TypeError(f"store must be a folder path, got {type(store).__name__}")
        return Path(store), dtype

    # ---- sharding ----------------------------------------------------------------------
    def _own_batches(self, source: DataSource, skip=None):
        """``(offset, batch)`` of the batches this rank handles (batch b -> rank b % world),
        leaving out batch indices in ``skip``; a plain DataLoader loads only those."""
        rank, world = rank_and_world()
        skip = skip or set()
        yield from source.batches_where(lambda b: b % world == rank and b not in skip)

    def _store_rows(self) -> tuple[int, int]:
        """The contiguous block of store rows this rank scores."""
        rank, world = rank_and_world()
        n = self.n_train
        return rank * n // world, (rank + 1) * n // world

    # ---- the store -----------------------------------------------------------------------
    def _store_config(self, with_data: bool) -> dict[str, Any]:
        members = []
        for _, view in self._views():
            spec = view.spec
            members.append(
                {
                    "name": spec.name,
                    "weight": spec.weight,
                    "params": fingerprint_tensors(view.params),
                    "masks": [[k.p, k.seed, list(k.modules or []), k.scale] for k in spec.masks],
                }
            )
        model = self.task.model
        config = {
            "model": fingerprint_tensors({**dict(model.named_parameters()), **dict(model.named_buffers())}),
            "members": members,
            "params": self._names,
            "projection": [p.describe() if p is not None else None for p in self._member_projections],
            "dims": self._dims,
            "dtype": self.store_dtype,
        }
        layouts = [self._engines[m].legacy_layout for m in range(len(self._specs))]
        if not all(layouts):  # tied or transposed layers: a layout earlier versions never wrote
            config["layout"] = 2
        if with_data:
            config.update(n=self.source.n, data=fingerprint_data(self.source))
        return config

    def _fill_store(self) -> None:
        rank, world = rank_and_world()
        config = self._store_config(with_data=True)

        def create() -> GradientStore:
            store = GradientStore.open(self._store_path, config)
            if not (self._store_path / "example.pt").exists():
                tmp = self._store_path / ".example.pt.tmp"
                torch.save(to_device(self._probe, torch.device("cpu")), tmp)  # the first few examples, cloned
                os.replace(tmp, self._store_path / "example.pt")
            return store

        # rank 0 creates (or checks) the store first; every rank then checks it against its
        # own model and data. A failure on any rank is raised on every rank (no rank hangs).
        store = _collectively(create if rank == 0 else None)
        if rank != 0:
            store = _collectively(lambda: GradientStore.open(self._store_path, config, create=False))
        else:
            _collectively(None)
        self._store = store
        if not store.complete:
            # a failure on any rank (bad example, out of memory, ...) is raised on every rank
            _collectively(lambda: self._write_store(store, rank), "could not write its share of the store", RankFailedError)
            if rank == 0:
                store.mark_complete()
            barrier()
        self._sqnorms = store.sqnorms()

    def _write_store(self, store: GradientStore, rank: int) -> None:
        n = self.source.n
        todo = [n - store.rows_done(m) for m in range(len(self._specs))]
        bar = self._bar(sum(todo), "per-example gradients -> store")
        try:
            for m, view in self._views():
                done = store.done(m)
                if len(done) and store.rows_done(m) == n:
                    continue
                mine = sorted(_own_ranges(store, m, rank))
                bs = self.source.fixed_batch_size
                finished = {b for b in range(-(-n // bs)) if (b * bs, min(bs, n - b * bs)) in done} if bs else set()
                for offset, batch in self._own_batches(self.source, finished):
                    count = batch_size_of(batch)
                    if (offset, count) in done:
                        continue
                    (_, feats), = self._featurize(view, self._names[m], _One(offset, batch), "training", bar)
                    sq = torch.einsum("bd,bd->b", feats, feats).double().cpu().numpy()
                    store.write(m, offset, feats, sq)  # data flushed first ...
                    mine.append((offset, count))
                    store.record(m, rank, mine)  # ... then the progress marker
                    del feats
        finally:
            bar.close()

    def _fit_from_store(self):
        if self._store_path is None:
            raise ValueError("fit() needs the training data; only an estimator with store=path can reopen a store without it")
        store = GradientStore.open_existing(self._store_path)
        self._probe = to_device(torch.load(self._store_path / "example.pt", weights_only=True), self.device)
        self._example = slice_batch(self._probe, 0, 1)
        self._setup_members()
        now = self._store_config(with_data=False)
        old = {k: v for k, v in store.config.items() if k in now}
        GradientStore._compare(self._store_path, old, now)
        self.source = None
        self.n_train = store.n
        self._store = store
        self._sqnorms = store.sqnorms()
        self._mark_fitted()
        return self

    # ---- top-k ---------------------------------------------------------------------------
    def top_k(self, test: Any, k: int, largest: bool = True) -> TopK:
        """The ``k`` training examples with the highest (``largest=False``: lowest)
        pairwise score for each test example, exactly, without forming the
        ``(n_test, n_train)`` matrix when the features are cached or stored.

        Scores are ``sum_m w_m g_test_j . g_train_i`` as in :meth:`pairwise`
        (positive = a step on training example i lowers test example j's loss),
        accumulated in fp32 block by block (``score_block_rows`` training rows at a
        time). Without a cache or store the features are recomputed and the full
        matrix is formed.

        Returns:
            :class:`TopK` ``(indices, scores)``, each ``(n_test, min(k, n_train))``.
        """
        self._check_fitted()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if self._store is None and len(self._cache) < len(self._specs):
            full = torch.from_numpy(self.pairwise(test))
            kk = min(k, full.shape[1])
            scores, idx = torch.topk(full, kk, dim=1, largest=largest)
            return TopK(idx.numpy(), scores.numpy())
        source = DataSource(test, batch_size=self.batch_size, name="test")
        queries, weights = [], []
        for m, view in self._views():
            names = self._names[m]
            q = [self._query_rows(view, names, f) for _, f in self._featurize(view, names, source, "test")]
            queries.append(torch.cat(q).float().cpu())
            weights.append(view.weight)
        parts = [top_k_blocked(queries, readers, weights, lo, hi, k, self.score_block_rows, largest) for lo, hi, readers in self._segments()]
        parts = [p for shard in all_gather(parts) for p in shard]
        scores, idx = merge_top_k(parts, k, largest)
        return TopK(idx.numpy(), scores.double().numpy())

    def _segments(self):
        """``(start, stop, readers)`` row ranges this rank holds, with a reader per member."""
        if self._store is not None:
            lo, hi = self._store_rows()
            store = self._store
            readers = [lambda s, e, m=m: store.rows(m, s, e) for m in range(len(self._specs))]
            return [(lo, hi, readers)] if hi > lo else []
        first = self._cache[0]
        if isinstance(first, list):
            out = []
            for j, (offset, f) in enumerate(first):
                chunks = [self._cache[m][j][1] for m in range(len(self._specs))]
                out.append((offset, offset + f.shape[0], [lambda s, e, c=c, o=offset: c[s - o : e - o] for c in chunks]))
            return out
        return [(0, self.n_train, [lambda s, e, m=m: self._cache[m][s:e] for m in range(len(self._specs))])]


def _collectively(fn, what: str = "could not open the store", raises: type[Exception] = StoreMismatchError):
    """Run ``fn`` (or nothing, when ``None``) on this rank; if it failed on any rank,
    raise on every rank (a rank that did not fail raises ``raises``, saying that
    another rank ``what``). Returns ``fn()``'s result."""
    result, error = None, None
    if fn is not None:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after every rank has heard of it
            error = e
    failures = [f for f in all_gather(None if error is None else f"{type(error).__name__}: {error}") if f]
    if error is not None:
        raise error
    if failures:
        raise raises(f"another rank {what}: {failures[0]}")
    return result


class _One:
    """A one-batch stand-in for a DataSource (feeds ``_featurize`` a single batch)."""

    def __init__(self, offset: int, batch):
        self.offset, self.batch = offset, batch

    def batches(self):
        yield self.offset, self.batch


def _own_ranges(store: GradientStore, m: int, rank: int) -> set[tuple[int, int]]:
    import json

    f = store.path / "progress" / f"m{m}.r{rank}.json"
    if not f.exists():
        return set()
    with open(f) as fh:
        return {(int(o), int(c)) for o, c in json.load(fh)}


__all__ = ["StoreMismatchError", "TopK"]
