"""Where the training features live: memory or the disk store, behind one interface.

Every score (``influence``, ``pairwise``, ``top_k``, ``self_influence``) and
every query transform reads training features through a
:class:`TrainingFeatures`: the rows this rank holds (``segments``), random
access to them (``rows``), the same rows in blocks (``blocks``) and the squared
feature norms of all rows (``sqnorms``). A member whose features were not kept
(``has(m)`` false: over the memory budget) is recomputed by the estimator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .distributed import rank_and_world


class TrainingFeatures:
    """The per-example training features of every member (see the module docstring).

    Attributes:
        n: number of training examples (all ranks together).
    """

    n: int

    def has(self, m: int) -> bool:
        """Whether member ``m``'s features are held (else the estimator recomputes them)."""
        raise NotImplementedError

    def segments(self) -> list[tuple[int, int]]:
        """The contiguous row ranges ``[start, stop)`` this rank holds, in order."""
        raise NotImplementedError

    def rows(self, m: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (inside one segment) of member ``m``, ``(stop - start, dim_m)``."""
        raise NotImplementedError

    def sqnorms(self) -> np.ndarray:
        """``(n_members, n)`` float64 squared feature norms, every row (all ranks)."""
        raise NotImplementedError

    def blocks(self, m: int, block_rows: int, device: torch.device | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, (b, dim_m))`` blocks of at most ``block_rows`` rows covering this rank's rows."""
        for lo, hi in self.segments():
            for s in range(lo, hi, block_rows):
                block = self.rows(m, s, min(s + block_rows, hi))
                yield s, block if device is None else block.to(device)


class MemoryFeatures(TrainingFeatures):
    """Features kept in memory after ``fit``.

    Args:
        cache: per kept member, a ``(n, dim)`` tensor (one process) or this rank's
            ``[(offset, (b, dim)), ...]`` batches (torch.distributed). Members
            over the memory budget are absent.
        n: number of training examples.
        sqnorms: ``(n_members, n)`` squared norms (all members, all rows).
    """

    def __init__(self, cache: dict[int, Any], n: int, sqnorms: np.ndarray):
        self.cache, self.n, self._sqnorms = cache, int(n), sqnorms

    def has(self, m: int) -> bool:
        return m in self.cache

    def segments(self) -> list[tuple[int, int]]:
        if not self.cache:
            return []
        first = next(iter(self.cache.values()))
        if isinstance(first, list):
            return [(o, o + f.shape[0]) for o, f in first]
        return [(0, self.n)] if self.n else []

    def rows(self, m: int, start: int, stop: int) -> torch.Tensor:
        held = self.cache[m]
        if not isinstance(held, list):
            return held[start:stop]
        for o, f in held:
            if o <= start and stop <= o + f.shape[0]:
                return f[start - o : stop - o]
        raise IndexError(f"rows {start}:{stop} are not in one batch this rank holds")

    def sqnorms(self) -> np.ndarray:
        return self._sqnorms


class StoreFeatures(TrainingFeatures):
    """Features in a :class:`hessfree.store.GradientStore`; this rank reads rows ``start:stop``."""

    def __init__(self, store: Any, start: int, stop: int):
        self.store, self.n = store, int(store.n)
        self.start, self.stop = int(start), int(stop)

    def has(self, m: int) -> bool:
        return True

    def segments(self) -> list[tuple[int, int]]:
        return [(self.start, self.stop)] if self.stop > self.start else []

    def rows(self, m: int, start: int, stop: int) -> torch.Tensor:
        return self.store.rows(m, start, stop)

    def blocks(self, m: int, block_rows: int, device: torch.device | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """The store's own stream: the next block is checked while this one is used."""
        for s, block in self.store.blocks(m, self.start, self.stop, block_rows):
            yield s, block if device is None else block.to(device)

    def sqnorms(self) -> np.ndarray:
        return self.store.sqnorms()


def fill_memory(members, cache: dict[int, Any], sqnorms: np.ndarray, budget: int, bar) -> None:
    """Compute this rank's training features of every member: keep them in ``cache``
    while they fit in ``budget`` bytes (in member order), record squared norms in
    ``sqnorms`` ``(n_members, n)`` either way.

    Args:
        members: ``(m, name, nbytes, blocks, norm_blocks)`` per member: ``blocks``
            yields ``(offset, (b, dim))`` features of this rank's batches;
            ``norm_blocks`` (or ``None``) yields ``(offset, (b,))`` squared norms
            without forming features, used for a member that is not kept.
        bar: a progress bar (``update``, ``close``).
    """
    world = rank_and_world()[1]
    try:
        for m, name, nbytes, blocks, norm_blocks in members:
            keep = nbytes <= budget
            if not keep and norm_blocks is not None:
                for offset, sq in norm_blocks:
                    if not np.isfinite(sq).all():
                        i = offset + int(np.flatnonzero(~np.isfinite(sq))[0])
                        raise FloatingPointError(f"non-finite gradient for training example {i} at member {name!r}")
                    sqnorms[m, offset : offset + len(sq)] = sq
                    bar.update(len(sq))
                continue
            chunks = []
            for offset, feats in blocks:
                sqnorms[m, offset : offset + feats.shape[0]] = torch.einsum("bd,bd->b", feats, feats).double().cpu().numpy()
                bar.update(feats.shape[0])
                if keep:
                    chunks.append((offset, feats.cpu()))
                del feats
            if keep:
                cache[m] = chunks if world > 1 else torch.cat([f for _, f in chunks])
                budget -= nbytes
    finally:
        bar.close()
