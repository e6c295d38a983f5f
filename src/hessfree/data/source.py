"""DataSource: an ordered, re-iterable source of batches with a known length."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

from .._checks import integer
from .batches import Batch, batch_size_of, map_batch, new_hash, slice_batch, update_hash
from .convert import as_tensor, check_loader_order, from_hf_dataset, is_from


class DataSource:
    """An ordered, re-iterable source of batches with a known length.

    Attributes:
        n: number of examples.
        batch_size: examples per batch (the last batch may be smaller).

    Raises:
        hessfree.errors.DataError: a loader that does not yield examples
            ``0..n-1`` in order (shuffled, a custom sampler or batch sampler
            with another order, ``drop_last=True``); a ``datasets.Dataset``
            column of strings, of rows of different lengths or of other
            non-numeric values; a pandas column of strings or with missing
            values; tensors with different numbers of rows.
        TypeError: data of an unsupported type.
    """

    def __init__(self, data: Any, batch_size: int = 256, name: str = "data"):
        if isinstance(data, DataSource):
            self._tensors, self._loader = data._tensors, data._loader
            self.n, self.name = data.n, data.name
            self.batch_size = batch_size
            return
        self.batch_size = integer(batch_size, "batch_size")
        self.name = name
        self._tensors: Batch | None = None
        self._loader: DataLoader | None = None
        if isinstance(data, (tuple, list)) and data and (all(isinstance(v, Mapping) for v in data)
                                                          or all(isinstance(v, tuple) for v in data)):
            # a list of examples (each a dict or an (x, y) tuple), as a map-style Dataset; (X, y) columns are arrays
            self._loader = DataLoader(data, batch_size=self.batch_size, shuffle=False)
        elif isinstance(data, (tuple, list)):
            tensors = tuple(as_tensor(v, f"{name}[{i}]") for i, v in enumerate(data))
            self._check_lengths({f"{name}[{i}]": t for i, t in enumerate(tensors)})
            self._tensors = tensors
        elif isinstance(data, Mapping) and not is_from(data, "datasets"):
            tensors = {k: as_tensor(v, f"{name}[{k!r}]") for k, v in data.items()}
            self._check_lengths({f"{name}[{k!r}]": t for k, t in tensors.items()})
            self._tensors = tensors
        elif is_from(data, "datasets"):
            tensors = from_hf_dataset(data, name)
            self._check_lengths({f"{name}[{k!r}]": t for k, t in tensors.items()})
            self._tensors = tensors
        elif is_from(data, "pandas"):
            raise TypeError(
                f"{name} is a pandas {type(data).__name__}; pass features and labels apart: "
                "(df[feature_columns], df[label_column])"
            )
        elif isinstance(data, DataLoader):
            check_loader_order(data, name)
            self._loader = data
        elif isinstance(data, Dataset):
            if not hasattr(data, "__len__"):
                raise TypeError(f"{name}: an iterable-style Dataset has no length; pass a map-style one")
            self._loader = DataLoader(data, batch_size=self.batch_size, shuffle=False)
        else:
            raise TypeError(
                f"{name} must be (X, y) tensors, a dict of tensors, a Dataset or a DataLoader; "
                f"got {type(data).__name__}"
            )
        if self._loader is not None:
            self.n = len(self._loader.dataset)
        else:
            self.n = batch_size_of(self._tensors)
        if self.n == 0:
            raise ValueError(f"{name} is empty (0 examples); pass at least one example")

    @staticmethod
    def _check_lengths(named: dict[str, torch.Tensor]) -> None:
        lengths = {k: (int(t.shape[0]) if t.dim() > 0 else None) for k, t in named.items()}
        if any(v is None for v in lengths.values()):
            bad = [k for k, v in lengths.items() if v is None]
            raise ValueError(f"{bad[0]} is a scalar; every tensor needs one row per example")
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{k} has {v} rows" for k, v in lengths.items())
            raise ValueError(
                f"length mismatch: {desc}; every tensor needs one row per example "
                "(check that features and labels come from the same split)"
            )

    def __len__(self) -> int:
        return self.n

    @property
    def in_memory(self) -> bool:
        """Whether the data is held as tensors (then :meth:`tensors` is free)."""
        return self._tensors is not None

    def tensors_without_loading(self) -> Batch | None:
        """All of the data as one batch when that needs no item to be loaded:
        tensor data, or a loader over a ``TensorDataset`` with the default
        collate function (its batches are slices of the dataset's tensors);
        ``None`` otherwise."""
        if self._tensors is not None:
            return self._tensors
        loader = self._loader
        if isinstance(loader.dataset, TensorDataset) and loader.collate_fn is default_collate:
            return tuple(loader.dataset.tensors)
        return None

    def __iter__(self) -> Iterator[Batch]:
        if self._tensors is not None:
            for start in range(0, self.n, self.batch_size):
                yield slice_batch(self._tensors, start, min(start + self.batch_size, self.n))
        else:
            for batch in self._loader:
                yield tuple(batch) if isinstance(batch, list) else batch

    def batches(self, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yield ``(offset, batch)`` pairs from example ``start`` on."""
        offset = 0
        if self._tensors is not None:
            for s in range(start, self.n, self.batch_size):
                yield s, slice_batch(self._tensors, s, min(s + self.batch_size, self.n))
            return
        for batch in self:
            b = batch_size_of(batch)
            if offset + b > start:
                skip = max(0, start - offset)
                yield offset + skip, slice_batch(batch, skip, b) if skip else batch
            offset += b

    @property
    def fixed_batch_size(self) -> int | None:
        """Examples in every batch but the last: the batch size for tensors and for a
        loader with the default batch sampler (sequential, ``drop_last=False``);
        ``None`` for a loader with a custom batch sampler."""
        if self._tensors is not None:
            return self.batch_size
        sampler = getattr(self._loader, "batch_sampler", None)
        plain = type(sampler) is BatchSampler and isinstance(sampler.sampler, SequentialSampler) and not sampler.drop_last
        return sampler.batch_size if plain else None

    def batches_where(self, keep) -> Iterator[tuple[int, Batch]]:
        """Yield ``(offset, batch)`` for the batches whose index ``b`` passes ``keep(b)``.

        Tensor data is sliced. A loader with the default batch sampler loads only
        the kept batches (same dataset, collate function and workers); any other
        loader is iterated in full and the rest is skipped.
        """
        if self._tensors is not None:
            for b, s in enumerate(range(0, self.n, self.batch_size)):
                if keep(b):
                    yield s, slice_batch(self._tensors, s, min(s + self.batch_size, self.n))
            return
        bs = self.fixed_batch_size
        if bs is None:
            for b, (offset, batch) in enumerate(self.batches()):
                if keep(b):
                    yield offset, batch
            return
        loader = self._loader
        index_lists = [list(range(s, min(s + bs, self.n))) for b, s in enumerate(range(0, self.n, bs)) if keep(b)]
        if not index_lists:
            return
        sub = DataLoader(loader.dataset, batch_sampler=index_lists, collate_fn=loader.collate_fn,
                         num_workers=loader.num_workers, pin_memory=loader.pin_memory)  # fmt: skip
        for idx, batch in zip(index_lists, sub):
            yield idx[0], tuple(batch) if isinstance(batch, list) else batch

    def fingerprint(self, samples: int = 64) -> str:
        """Hash of the size and of ``samples`` evenly spaced examples (SHA-256, 32 hex digits).

        A cheap first check that a store was written from this data (a different
        split, order or size is found before any work); every example is covered by
        the per-batch hashes the store records as well.
        """
        n = self.n
        idx = sorted({int(i) for i in np.linspace(0, n - 1, num=min(samples, n))})
        h = new_hash()
        h.update(f"n={n}".encode())
        if self._tensors is not None:
            for i in idx:
                update_hash(h, slice_batch(self._tensors, i, i + 1))
        else:
            dataset = self._loader.dataset
            for i in idx:
                update_hash(h, dataset[i])
        return h.hexdigest()[:32]

    def shuffled(self, generator: torch.Generator) -> Iterator[Batch]:
        """Batches of ``batch_size`` examples in a random order drawn from ``generator``,
        for training. In-memory data is permuted; data behind a Dataset or DataLoader is
        read in its own order (its loader decides)."""
        if self._tensors is None:
            yield from iter(self)
            return
        order = torch.randperm(self.n, generator=generator)
        for s in range(0, self.n, self.batch_size):
            yield map_batch(self._tensors, lambda t, idx=order[s : s + self.batch_size]: t[idx])

    def tiling(self) -> list[tuple[int, int]]:
        """``(offset, count)`` of every batch, in order (a loader's batch sampler is read
        for the sizes; no item is loaded)."""
        n, bs = self.n, self.fixed_batch_size
        if bs is not None:
            return [(s, min(bs, n - s)) for s in range(0, n, bs)]
        out, offset = [], 0
        for idx in self._loader.batch_sampler:
            out.append((offset, len(idx)))
            offset += len(idx)
        return out

    def batches_at(self, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, Batch]]:
        """``(offset, batch)`` for the row ranges ``(offset, count)``, by offset: slices of
        tensors, or a loader's items at exactly those ranges (same dataset, collate
        function and workers). A loader with a custom batch sampler is iterated and
        yields only the ranges that are among its batches: compare the offsets yielded
        with ``ranges`` to find any it does not have."""
        ranges = sorted(ranges)
        if not ranges:
            return
        if self._tensors is not None:
            for o, c in ranges:
                yield o, slice_batch(self._tensors, o, o + c)
            return
        loader = self._loader
        if self.fixed_batch_size is not None:
            index_lists = [list(range(o, o + c)) for o, c in ranges]
            sub = DataLoader(loader.dataset, batch_sampler=index_lists, collate_fn=loader.collate_fn,
                             num_workers=loader.num_workers, pin_memory=loader.pin_memory)  # fmt: skip
            for (o, _), batch in zip(ranges, sub):
                yield o, tuple(batch) if isinstance(batch, list) else batch
            return
        want = set(ranges)
        for offset, batch in self.batches():
            if (offset, batch_size_of(batch)) in want:
                want.discard((offset, batch_size_of(batch)))
                yield offset, batch

    def first_example(self) -> Batch:
        """The first example as a batch of one."""
        for batch in self:
            return slice_batch(batch, 0, 1)
        raise ValueError(f"{self.name} is empty")

    def tensors(self) -> Batch:
        """All of the data concatenated into one batch (for small held-out sets)."""
        if self._tensors is not None:
            return self._tensors
        parts = list(self)
        if isinstance(parts[0], Mapping):
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
