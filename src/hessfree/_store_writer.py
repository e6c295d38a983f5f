"""Helpers of the on-disk store's writer: batch tilings, data hashes, loss descriptions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data import DataSource, batch_hash, batch_size_of, slice_batch
from .distributed import all_gather, rank_and_world
from .store import GradientStore, StoreMismatchError, fingerprint_tensors


def batch_tiling(source: DataSource) -> list[tuple[int, int]]:
    """``(offset, count)`` of every batch of ``source``, in order (a loader's batch
    sampler is read for the sizes; no item is loaded)."""
    n, bs = source.n, source.fixed_batch_size
    if bs is not None:
        return [(s, min(bs, n - s)) for s in range(0, n, bs)]
    out, offset = [], 0
    for idx in source._loader.batch_sampler:
        out.append((offset, len(idx)))
        offset += len(idx)
    return out


def batches_at(source: DataSource, ranges: list[tuple[int, int]]):
    """``(offset, batch)`` for the row ranges ``ranges`` of ``source``: slices of tensors,
    or a loader's items at exactly those ranges (same dataset, collate function and
    workers). A loader with a custom batch sampler is iterated and must yield them."""
    ranges = sorted(ranges)
    if not ranges:
        return
    if source.in_memory:
        for o, c in ranges:
            yield o, slice_batch(source._tensors, o, o + c)
        return
    loader = source._loader
    if source.fixed_batch_size is not None:
        index_lists = [list(range(o, o + c)) for o, c in ranges]
        sub = DataLoader(loader.dataset, batch_sampler=index_lists, collate_fn=loader.collate_fn,
                         num_workers=loader.num_workers, pin_memory=loader.pin_memory)  # fmt: skip
        for (o, _), batch in zip(ranges, sub):
            yield o, tuple(batch) if isinstance(batch, list) else batch
        return
    want = set(ranges)
    for offset, batch in source.batches():
        if (offset, batch_size_of(batch)) in want:
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


def same_on_every_rank(digest: str, path: Path) -> None:
    """Raise on every rank when the ranks' data hashes differ (under torch.distributed)."""
    rank, world = rank_and_world()
    if world == 1:
        return
    got = all_gather(digest)
    bad = [r for r, d in enumerate(got) if d != got[0]]
    if bad:
        if rank == 0:
            raise StoreMismatchError(f"another rank (rank {bad[0]}) was given different training data than rank 0 "
                                     f"for the store at {str(path)!r}; give every rank the same data")  # fmt: skip
        raise StoreMismatchError(f"rank {rank} was given different training data than rank 0 for the store at "
                                 f"{str(path)!r}; give every rank the same data")  # fmt: skip


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
