"""The estimator's scale-out parts: the on-disk store, sharding over ranks, top-k.

Kept apart from :mod:`hessfree.influence` so the estimator reads as the math;
:class:`hessfree.Influence` inherits these methods.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._checks import integer
from ._io import atomic_write_json, check_settings
from ._modes import eval_mode
from ._store_writer import (  # noqa: I001
    batch_tiling,
    batches_at,
    data_differ,
    describe_loss,
    hashes_at,
    name_rows_that_differ,
    same_data_on_every_rank,
)
from .data import DataSource, batch_hash, batch_size_of, combine_hashes, slice_batch, to_device
from .distributed import RankFailedError, all_gather, rank_and_world
from .feature_source import StoreFeatures
from .scoring import merge_top_k, top_k_blocked
from .store import (
    DTYPES,
    GradientStore,
    StoreCorruptError,
    StoreMismatchError,
    fingerprint_data,
    fingerprint_tensors,
    rounded_losses,
)


class TopK(NamedTuple):
    """Result of :meth:`hessfree.Influence.top_k`.

    Attributes:
        indices: ``(n_test, k)`` training-row indices, best first.
        scores: ``(n_test, k)`` their pairwise scores (the units and dtype of ``pairwise``).
    """

    indices: np.ndarray
    scores: np.ndarray


class StoreMixin:
    _score_block_rows: int = 8192

    @property
    def score_block_rows(self) -> int:
        """Training rows per block when scoring (memory ~ block x dim x 4 bytes); default 8192.

        Raises:
            ValueError: set to anything but an integer >= 1.
        """
        return self._score_block_rows

    @score_block_rows.setter
    def score_block_rows(self, value: int) -> None:
        self._score_block_rows = integer(value, "score_block_rows")

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

    @staticmethod
    def _store_rows(n: int) -> tuple[int, int]:
        """The contiguous block of the ``n`` store rows this rank scores."""
        rank, world = rank_and_world()
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
            "estimator": f"{type(self).__module__}.{type(self).__qualname__}",
            "loss": describe_loss(self.task),
            "probe_loss": self._probe_losses(),
        }
        layouts = [self._engines[m].legacy_layout for m in range(len(self._specs))]
        if not all(layouts):  # tied or transposed layers: a layout earlier versions never wrote
            config["layout"] = 2
        if with_data:
            config.update(n=self.source.n, data=fingerprint_data(self.source))
        return config

    def _check_arguments(self) -> None:
        """Compare the arguments the stored features depend on (members, params,
        projection, store dtype) with ``<store>/arguments.json``, when it exists."""
        path = self._store_path / "arguments.json"
        if path.exists():
            saved, now = json.loads(path.read_text()), self.arguments.features_dict()
            check_settings(path, {k: saved.get(k) for k in now}, now, StoreMismatchError,
                           fix="pass the arguments the store was written with, or use a new store folder")  # fmt: skip

    def _save_arguments(self) -> None:
        """Write ``<store>/arguments.json`` (every option of this estimator, as JSON) when
        it is missing or differs; a complete store in a read-only folder is left as it is."""
        path, now = self._store_path / "arguments.json", self.arguments.to_dict()
        try:
            if not path.exists() or json.loads(path.read_text()) != now:
                atomic_write_json(path, now)
        except OSError:  # read-only folder: the store is still read; the record is not updated
            pass

    def _probe_losses(self) -> list[float]:
        """The (sample-weighted) training losses of the stored examples at the model, in
        eval mode, rounded: they change with the loss function, whatever its form."""
        model = self.task.model
        with torch.no_grad(), eval_mode(model):
            losses = self.task.per_example_loss(model, self._probe)
        return rounded_losses(losses.detach().double().cpu().numpy())

    def _check_same_data(self) -> None:
        """Under torch.distributed, refuse training data that differ between ranks (before any gradient)."""
        self._data_hashes = same_data_on_every_rank(self.source, "training data", self._first_batch_hash)

    def _fill_store(self) -> None:
        rank = rank_and_world()[0]
        source = self.source
        config = self._store_config(with_data=True)
        tiling = batch_tiling(source)
        t = time.perf_counter()
        # tensors are hashed whole up front (no loading); a loader's batches as they are loaded
        hashes = self._data_hashes or (  # tensor data already hashed by _check_same_data under torch.distributed
            hashes_at(source, tiling) if source.in_memory else {tiling[0]: self._first_batch_hash})
        hash_s = time.perf_counter() - t
        probe = to_device(self._probe, torch.device("cpu"))

        def create() -> GradientStore:
            try:
                store = GradientStore.open(self._store_path, config, example=probe)
            except StoreMismatchError:  # only the data differ: name the rows, as for a complete store below
                if source.in_memory:
                    name_rows_that_differ(self._store_path, config, lambda s: self._check_stored_data(s, hashes))
                raise
            if not store.complete:
                store.retain(tiling)  # batches cut otherwise by an earlier run are written again
            return store

        # rank 0 creates (or checks) the store first; every rank then checks it against its
        # own model and data. A failure on any rank is raised on every rank (no rank hangs).
        _collectively(self._check_arguments)  # before any gradient is computed
        store = _collectively(create if rank == 0 else None)
        try:
            if rank != 0:
                store = _collectively(lambda: GradientStore.open(self._store_path, config, create=False))
            else:
                _collectively(None)
            store.add_integrity_time(hash_s)
            # the same data on every rank: all of it for tensors, the first batch for a loader
            self._store = store
            if store.complete:
                _collectively(lambda: self._check_stored_data(store, hashes), "found training data that differ from the store's")
            else:
                # a failure on any rank (bad example, out of memory, ...) is raised on every rank
                _collectively(lambda: self._write_store(store, rank, tiling, hashes),
                              "could not write its share of the store", RankFailedError)  # fmt: skip
                _collectively(store.mark_complete if rank == 0 else None, "could not complete the store")
                _collectively(lambda: self._check_completed(store, hashes), "found the completed store inconsistent")
            self._train_source = StoreFeatures(store, *self._store_rows(store.n))
            self._sqnorms = self._train_source.sqnorms()
            _collectively(self._save_arguments if rank == 0 else None, "could not save arguments.json")
        finally:
            if store is not None:
                store.release()

    def _check_completed(self, store: GradientStore, hashes: dict[tuple[int, int], str]) -> None:
        store.refresh()
        if self.source.in_memory and store.data_hash != combine_hashes([(o, c, h) for (o, c), h in hashes.items()]):
            raise StoreMismatchError(f"the store at {str(store.path)!r} was completed with other training data than "
                                     "this rank's (another process wrote to it?)")  # fmt: skip

    def _check_stored_data(self, store: GradientStore, hashes: dict[tuple[int, int], str]) -> None:
        """Hash the training data at the store's batches and compare each batch with the
        hash recorded when it was written: every rank all of tensor data, or its
        share of a loader's batches (loaded once, no gradients)."""
        rank, world = rank_and_world()
        recs = store.records(0)
        ranges = [r[:2] for r in recs]
        if combine_hashes([r[:3] for r in recs]) != store.data_hash:
            raise StoreCorruptError(f"the progress files of the store at {str(store.path)!r} do not match its meta.json; "
                                    "delete the folder and run est.fit(train) again")  # fmt: skip
        t = time.perf_counter()
        if self.source.in_memory:
            got = hashes if set(hashes) == set(ranges) else hashes_at(self.source, ranges)
        else:
            own = [r for b, r in enumerate(ranges) if b % world == rank]
            got = {(o, batch_size_of(batch)): batch_hash(batch) for o, batch in batches_at(self.source, own)}
        store.add_integrity_time(time.perf_counter() - t)
        differ = [r[:2] for r in recs if r[:2] in got and got[r[:2]] != r[2]]
        if differ:
            raise data_differ(store, differ)

    def _write_store(self, store: GradientStore, rank: int, tiling: list[tuple[int, int]], hashes: dict) -> None:
        n, n_members = self.source.n, len(self._specs)
        _, world = rank_and_world()
        recs = [{r[:2]: r for r in store.records(m)} for m in range(n_members)]
        known = dict(hashes)
        # the data of written batches this rank would not load again: hashed and compared first
        own = [r for b, r in enumerate(tiling) if b % world == rank]
        written = [r for r in own if all(r in recs[m] for m in range(n_members))]
        t = time.perf_counter()
        if self.source.in_memory:
            got = {r: known[r] for r in written}
        else:
            got = {(o, batch_size_of(batch)): batch_hash(batch) for o, batch in batches_at(self.source, written)}
        store.add_integrity_time(time.perf_counter() - t)
        differ = [r for r in written if any(recs[m][r][2] != got.get(r) for m in range(n_members))]
        if differ:
            raise data_differ(store, differ)
        todo = [n - sum(c for _, c in recs[m]) for m in range(n_members)]
        bar = self._bar(sum(todo), "per-example gradients -> store")
        try:
            for m, view in self._views():
                if not todo[m]:
                    continue
                mine = _own_records(store, m, rank)
                finished = {b for b, r in enumerate(tiling) if r in recs[m]}
                for offset, batch in self._own_batches(self.source, finished):
                    count = batch_size_of(batch)
                    if (offset, count) in recs[m]:
                        continue
                    t = time.perf_counter()
                    h = known.get((offset, count)) if self.source.in_memory else batch_hash(batch)
                    store.add_integrity_time(time.perf_counter() - t)
                    seen = [recs[k][(offset, count)][2] for k in range(n_members) if (offset, count) in recs[k]]
                    if (offset, count) in known:
                        seen.append(known[(offset, count)])
                    if h is None or any(s != h for s in seen):
                        raise data_differ(store, [(offset, count)])
                    known[(offset, count)] = h
                    (_, feats), = self._featurize(view, self._names[m], _One(offset, batch), "training", bar)
                    sq = torch.einsum("bd,bd->b", feats, feats).double().cpu().numpy()
                    rec = store.write(m, offset, feats, sq, h)  # data flushed first ...
                    mine.append(rec)
                    store.record(m, rank, mine)  # ... then the progress marker
                    recs[m][(offset, count)] = rec
                    del feats
        finally:
            bar.close()

    def _fit_from_store(self):
        if self._store_path is None:
            raise ValueError("fit() needs the training data; only an estimator with store=path can reopen a store without it")
        store = GradientStore.open_existing(self._store_path)
        try:
            probe = torch.load(self._store_path / "example.pt", weights_only=True)
        except FileNotFoundError:
            raise StoreCorruptError(f"{str(self._store_path / 'example.pt')!r} is missing; delete the folder and run "
                                    "est.fit(train) again") from None  # fmt: skip
        except Exception as e:  # a damaged pickle raises many kinds of error
            raise StoreCorruptError(f"{str(self._store_path / 'example.pt')!r} cannot be read ({type(e).__name__}: "
                                    f"{e}); delete the folder and run est.fit(train) again") from None  # fmt: skip
        self._probe = to_device(probe, self.device)
        self._example = slice_batch(self._probe, 0, 1)
        self._setup_members()
        now = self._store_config(with_data=False)
        old = {k: v for k, v in store.config.items() if k not in ("n", "data", "format")}
        GradientStore.check_config(self._store_path, old, now)
        self.source = None
        self.n_train = store.n
        self._store = store
        self._check_arguments()
        self._train_source = StoreFeatures(store, *self._store_rows(store.n))
        self._sqnorms = self._train_source.sqnorms()
        if rank_and_world()[0] == 0:
            self._save_arguments()
        self._mark_fitted()
        return self

    # ---- top-k ---------------------------------------------------------------------------
    def top_k(self, test: Any, k: int, largest: bool = True) -> TopK:
        """The ``k`` training examples with the highest (``largest=False``: lowest)
        pairwise score for each test example, exactly, without forming the
        ``(n_test, n_train)`` matrix when the features are cached or stored.

        Scores are ``sum_m w_m g_test_j . g_train_i`` as in :meth:`pairwise`
        (positive = a step on training example i lowers test example j's loss),
        accumulated block by block (``score_block_rows`` training rows at a time) in
        the dtype of :meth:`pairwise` (float32; float64 for a float64 model).
        Without a cache or store the features are recomputed and the full matrix
        is formed. Among exactly tied scores the order of the indices is unspecified
        (it may change with ``score_block_rows``).

        Returns:
            :class:`TopK` ``(indices, scores)``, each ``(n_test, min(k, n_train))``.
        """
        self._check_fitted()
        k = integer(k, "k")
        features = self._train_source
        if not all(features.has(m) for m in range(len(self._specs))):  # recomputed: the full matrix
            full = torch.from_numpy(self.pairwise(test))
            kk = min(k, full.shape[1])
            scores, idx = torch.topk(full, kk, dim=1, largest=largest)
            return TopK(idx.numpy(), scores.numpy())
        source = DataSource(test, batch_size=self.batch_size, name="test")
        queries, weights = [], []
        for m, view in self._views():
            names = self._names[m]
            q = [self._query_rows(view, names, f) for _, f in self._featurize(view, names, source, "test")]
            queries.append(torch.cat(q).to(self._score_dtype()).cpu())
            weights.append(view.weight)
        blocks = [features.blocks(m, self.score_block_rows) for m in range(len(self._specs))]  # streamed
        parts = [p for shard in all_gather([top_k_blocked(queries, blocks, weights, k, largest, self._score_dtype())])
                 for p in shard]  # fmt: skip
        scores, idx = merge_top_k(parts, k, largest)
        return TopK(idx.numpy(), scores.numpy())

    def _score_dtype(self) -> torch.dtype:
        """Of score products and sums: float64 for a model with float64 parameters, else float32."""
        return torch.float64 if any(p.dtype == torch.float64 for p in self.task.model.parameters()) else torch.float32


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


def _own_records(store: GradientStore, m: int, rank: int) -> list[tuple]:
    """The batches recorded in rank ``rank``'s progress file of member ``m``."""
    f = store.path / "progress" / f"m{m}.r{rank}.json"
    if not f.exists():
        return []
    return [tuple(r) for r in json.loads(f.read_text())]


__all__ = ["StoreMismatchError", "TopK"]

