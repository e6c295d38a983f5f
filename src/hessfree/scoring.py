"""Blocked, streamed scoring: matrix products over blocks of training rows.

Every function here reads training features block by block (from memory or
from a :class:`hessfree.store.GradientStore`), multiplies in fp32 and never
holds more than one block of training rows plus the (small) queries, so memory
is bounded by the block size, not by the number of training examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

BlockReader = Callable[[int, int], torch.Tensor]  # (start, stop) -> (stop - start, D) fp32


def stream_scores(queries: torch.Tensor, blocks: Iterable[tuple[int, torch.Tensor]], out: np.ndarray) -> np.ndarray:
    """``out[:, offset:offset+b] = queries @ block.T`` for each block (fp32 products).

    Args:
        queries: ``(Q, D)`` fp32 query rows.
        blocks: ``(offset, (b, D))`` training-feature blocks.
        out: ``(Q, n)`` array to fill (any float dtype). A column-major fp32
            array (``np.empty((Q, n), np.float32, order="F")``) is written in
            place, with no temporary per block.
    """
    q = queries.float()
    direct = out.dtype == np.float32 and out.T.flags.c_contiguous and q.device.type == "cpu"
    for offset, block in blocks:
        stop = offset + block.shape[0]
        if direct:  # column-major output: each block's scores are contiguous rows of out.T
            torch.mm(block.float(), q.T, out=torch.from_numpy(out.T[offset:stop]))
        else:
            out[:, offset:stop] = (q @ block.to(q.device).float().T).cpu().numpy()
    return out


def top_k_blocked(
    queries: Sequence[torch.Tensor],
    readers: Sequence[BlockReader],
    weights: Sequence[float],
    start: int,
    stop: int,
    k: int,
    block_rows: int = 8192,
    largest: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` training rows in ``start:stop`` for each query row of the
    ensemble score ``S[j, i] = sum_m w_m queries[m][j] . F_m[i]``.

    Args:
        queries: per member ``(Q, D_m)`` fp32 query rows.
        readers: per member ``(start, stop) -> (stop - start, D_m)`` fp32 feature rows.
        weights: per member weight ``w_m``.
        largest: ``True`` for the highest scores, ``False`` for the lowest.

    Returns:
        ``(scores, indices)``, each ``(Q, min(k, stop - start))``; indices are
        absolute row numbers, scores are fp32 sums, sorted best first.
    """
    n_q = queries[0].shape[0]
    best_s = torch.empty(n_q, 0)
    best_i = torch.empty(n_q, 0, dtype=torch.long)
    for s in range(start, stop, block_rows):
        e = min(s + block_rows, stop)
        block = torch.zeros(n_q, e - s)
        for q, read, w in zip(queries, readers, weights):
            block.addmm_(q.float(), read(s, e).float().T, alpha=float(w))
        cand_s = torch.cat([best_s, block], dim=1)
        cand_i = torch.cat([best_i, torch.arange(s, e).expand(n_q, -1)], dim=1)
        kk = min(k, cand_s.shape[1])
        best_s, pos = torch.topk(cand_s, kk, dim=1, largest=largest, sorted=True)
        best_i = torch.gather(cand_i, 1, pos)
    return best_s, best_i


def merge_top_k(parts: Iterator[tuple[torch.Tensor, torch.Tensor]], k: int, largest: bool = True):
    """Merge per-shard ``(scores, indices)`` top-k lists into one exact top-k."""
    parts = list(parts)
    scores = torch.cat([p[0] for p in parts], dim=1)
    idx = torch.cat([p[1] for p in parts], dim=1)
    kk = min(k, scores.shape[1])
    best, pos = torch.topk(scores, kk, dim=1, largest=largest, sorted=True)
    return best, torch.gather(idx, 1, pos)
