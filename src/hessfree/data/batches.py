"""Batches (tuples or dicts of tensors): size, mapping, slicing, and content hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch

Batch = Union[tuple, dict]


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


def update_hash(h, item: Any) -> None:
    if isinstance(item, torch.Tensor):
        t = item.detach()
        h.update(f"T{tuple(t.shape)}{t.dtype}|".encode())
        t = t.to("cpu").contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the bytes as they are: no copy on the CPU
    elif isinstance(item, np.ndarray):
        update_hash(h, torch.from_numpy(np.ascontiguousarray(item)))
    elif isinstance(item, Mapping):
        h.update(f"D{len(item)}|".encode())
        for k in sorted(item, key=str):
            h.update(f"K{k!r}|".encode())
            update_hash(h, item[k])
    elif isinstance(item, (list, tuple)):
        h.update(f"L{len(item)}|".encode())
        for v in item:
            update_hash(h, v)
    else:
        h.update(f"V{item!r}|".encode())


def new_hash():
    """The hash the library fingerprints data and tensors with: SHA-256, which
    processors with SHA instructions (recent x86 and ARM) run at about 1 GB/s,
    2-3 times blake2b's speed."""
    return hashlib.sha256()


def batch_hash(batch: Any) -> str:
    """A SHA-256 hash of everything in ``batch``: each tensor's dtype, shape and
    bytes (inputs, labels, sample weights), dict keys and the position of each
    item; any other value by its ``repr``. Equal batches give equal hashes on any
    machine; any changed value, label or weight gives another one.

    Returns:
        32 hexadecimal digits (the first 128 bits).
    """
    h = new_hash()
    update_hash(h, batch)
    return h.hexdigest()[:32]


def combine_hashes(parts: list[tuple[int, int, str]]) -> str:
    """One hash of ``(offset, count, batch_hash)`` parts, taken in offset order:
    the hash of a whole data set cut into those batches."""
    h = new_hash()
    for o, c, part in sorted(parts):
        h.update(f"{o}:{c}:{part};".encode())
    return h.hexdigest()[:32]
