"""Turn what users pass as data into an ordered stream of batches.

Influence scores are indexed by position in the training data, so every data
source here is iterated in a fixed order, and shuffling loaders are refused.

Accepted forms:

* a tuple/list of tensors or arrays ``(X, y)`` or ``(X, y, sample_weight)``;
* a dict of tensors (for example ``input_ids``, ``attention_mask``, ``labels``);
* a map-style ``torch.utils.data.Dataset`` (items are tuples or dicts);
* a ``torch.utils.data.DataLoader`` with a sequential sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

Batch = Union[tuple, dict]


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(
        f"{what} must be a torch.Tensor or numpy array, got {type(value).__name__}; "
        "convert it with torch.as_tensor(...)"
    )


def batch_size_of(batch: Batch) -> int:
    """Number of examples in ``batch`` (the length of its first tensor)."""
    leaves = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[0])
    raise TypeError("a batch must hold at least one tensor")


def map_batch(batch: Batch, fn) -> Batch:
    """Apply ``fn`` to every tensor of a tuple or dict batch."""
    if isinstance(batch, Mapping):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return tuple(fn(v) if isinstance(v, torch.Tensor) else v for v in batch)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return map_batch(batch, lambda t: t.to(device, non_blocking=True))


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return map_batch(batch, lambda t: t[start:stop])


class DataSource:
    """An ordered, re-iterable source of batches with a known length.

    Attributes:
        n: number of examples.
        batch_size: examples per batch (the last batch may be smaller).
    """

    def __init__(self, data: Any, batch_size: int = 256, name: str = "data"):
        if isinstance(data, DataSource):
            self._tensors, self._loader = data._tensors, data._loader
            self.n, self.name = data.n, data.name
            self.batch_size = batch_size
            return
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.name = name
        self._tensors: Batch | None = None
        self._loader: DataLoader | None = None
        if isinstance(data, (tuple, list)):
            tensors = tuple(_as_tensor(v, f"{name}[{i}]") for i, v in enumerate(data))
            self._check_lengths({f"{name}[{i}]": t for i, t in enumerate(tensors)})
            self._tensors = tensors
        elif isinstance(data, Mapping):
            tensors = {k: _as_tensor(v, f"{name}[{k!r}]") for k, v in data.items()}
            self._check_lengths({f"{name}[{k!r}]": t for k, t in tensors.items()})
            self._tensors = tensors
        elif isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler):
                raise ValueError(
                    f"{name}: the DataLoader uses {type(data.sampler).__name__}; influence "
                    "scores are indexed by example position, so pass a loader with "
                    "shuffle=False (or the Dataset itself)"
                )
            if getattr(data, "drop_last", False):
                raise ValueError(f"{name}: the DataLoader has drop_last=True; set drop_last=False")
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
