"""Helpers of the on-disk store's writer: batch tilings, data hashes, loss descriptions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ._io import settings_differ
from .data import DataSource, batch_hash, batch_size_of, combine_hashes
from .distributed import all_gather, rank_and_world
from .errors import DataError, HessfreeError
from .store import GradientStore, StoreMismatchError, fingerprint_tensors


def batch_tiling(source: DataSource) -> list[tuple[int, int]]:
    """``(offset, count)`` of every batch of ``source``, in order (no item is loaded)."""
    return source.tiling()


def batches_at(source: DataSource, ranges: list[tuple[int, int]]):
    """``(offset, batch)`` for the row ranges ``ranges`` of ``source`` (see
    :meth:`DataSource.batches_at`); a range the loader does not yield as one of its
    batches raises :class:`StoreMismatchError`."""
    want = set(ranges)
    for offset, batch in source.batches_at(sorted(ranges)):
        want.discard((offset, batch_size_of(batch)))
        yield offset, batch
    if want:
        o, c = min(want)
        raise StoreMismatchError(
            f"the store was written in batches this loader does not yield (rows {o}-{o + c - 1}); pass the loader "
            "the store was written with, or call est.fit() without data to reuse the store"
        )


def hashes_at(source: DataSource, ranges: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    return {(o, batch_size_of(batch)): batch_hash(batch) for o, batch in batches_at(source, ranges)}


def data_differ(store: GradientStore, ranges: list[tuple[int, int]]) -> StoreMismatchError:
    o, c = min(ranges)
    more = f" (and {len(ranges) - 1} more batches)" if len(ranges) > 1 else ""
    return StoreMismatchError(
        f"the training data differ from the data the store at {str(store.path)!r} was written with: rows "
        f"{o}-{o + c - 1}{more} hold another input, label or sample weight (or a Dataset with random transforms "
        "gives other values each time); use a new store path for these data, or delete the old store"
    )


def name_rows_that_differ(path: Path, config: dict[str, Any], check) -> None:
    """When the complete store at ``path`` differs from ``config`` only in its data (the
    quick data fingerprint and the probe losses), ``check(store)`` compares it batch by
    batch and raises naming the rows; otherwise nothing (the caller raises its error)."""
    try:
        store = GradientStore.open_existing(path)
    except HessfreeError:  # incomplete or unreadable: the settings error stands
        return
    saved = {k: v for k, v in store.config.items() if k != "format"}
    if set(settings_differ(saved, config)) <= {"data", "probe_loss"}:
        check(store)


def same_data_on_every_rank(source: DataSource | None, what: str, first_hash: str | None = None) -> dict | None:
    """Under torch.distributed (a collective call), raise on every rank when the ranks' ``what``
    (training, test or target data) differ: all of tensor data is hashed, of a loader its
    length and first batch (``first_hash`` when already known). Returns tensor data's
    per-batch hashes (for the store); ``None`` in one process or for a loader."""
    if source is None or rank_and_world()[1] == 1:
        return None
    if source.in_memory:
        hashes = hashes_at(source, batch_tiling(source))
    else:
        hashes = {(0, source.n): first_hash if first_hash is not None else batch_hash(next(iter(source)))}
    same_on_every_rank(combine_hashes([(o, c, h) for (o, c), h in hashes.items()] + [(source.n, 0, "n")]), what)
    return hashes if source.in_memory else None


def same_on_every_rank(digest: str, what: str = "training data") -> None:
    """Raise on every rank when the ranks' hashes of ``what`` differ (under torch.distributed;
    a collective call). Every rank must pass the same data: each computes its share of
    the scores from it, and the sums would mix different data."""
    rank, world = rank_and_world()
    if world == 1:
        return
    got = all_gather(digest)
    bad = [r for r, d in enumerate(got) if d != got[0]]
    if bad:
        who = f"another rank (rank {bad[0]})" if rank == 0 else f"rank {rank}"
        raise DataError(f"{who} was given different {what} than rank 0 (other rows, values or length); every rank "
                        f"must be given the same {what}")  # fmt: skip


def describe_loss(task) -> dict[str, Any]:
    """The task's class and options (and an ``nn.Module`` loss's class, options and
    tensors): the part of the loss a store checks by name."""

    def simple(v):
        if isinstance(v, (str, int, float, bool, type(None))):
            return v
        if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool, type(None))) for x in v):
            return list(v)
        return type(v).__name__

    options = {k: simple(v) for k, v in sorted(vars(task).items()) if not k.startswith("_") and k not in ("model", "loss_fn")}
    fn = getattr(task, "loss_fn", None)
    if isinstance(fn, torch.nn.Module):
        options["loss_fn"] = {
            "class": f"{type(fn).__module__}.{type(fn).__qualname__}",
            "options": {k: simple(v) for k, v in sorted(vars(fn).items()) if not k.startswith("_") and k != "training"},
            "tensors": fingerprint_tensors({**dict(fn.named_parameters()), **dict(fn.named_buffers())}),
        }
    return {"task": f"{type(task).__module__}.{type(task).__qualname__}", "options": options}
