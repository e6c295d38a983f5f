"""A seeded random sample of the user's data, in the form the estimator accepts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import DataSource, map_batch


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """``min(size, n)`` distinct indices in ``[0, n)``, sorted (``numpy`` generator seeded by ``seed``)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def take(data: Any, idx: np.ndarray, batch_size: int, name: str) -> Any:
    """The examples ``idx`` of ``data`` (tensors, dict, Dataset or DataLoader):
    tensors are indexed (one batch in memory), datasets wrapped in a ``Subset``
    read through the loader's collate function."""
    source = DataSource(data, batch_size=batch_size, name=name)
    tensors = source.tensors_without_loading()
    index = torch.as_tensor(idx, dtype=torch.long)
    if tensors is not None:
        return map_batch(tensors, lambda t: t[index])
    if isinstance(data, DataLoader):
        return DataLoader(Subset(data.dataset, idx.tolist()), batch_size=batch_size, shuffle=False,
                          collate_fn=data.collate_fn)  # fmt: skip
    if isinstance(data, Dataset):
        return Subset(data, idx.tolist())
    raise TypeError(f"{name}: cannot take a sample of {type(data).__name__}")  # DataSource accepted it: not reached


def size_of(data: Any, name: str) -> int:
    """Number of examples in ``data`` (checked by :class:`hessfree.DataSource`)."""
    return DataSource(data, name=name).n
