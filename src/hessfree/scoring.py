"""Blocked, streamed scoring: matrix products over blocks of training rows.

Every function here reads training features block by block (from memory or
from a :class:`hessfree.store.GradientStore`), multiplies in fp32 and never
holds more than one block of training rows plus the (small) queries, so memory
is bounded by the block size, not by the number of training examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch


def accumulate_scores(into: torch.Tensor, queries: torch.Tensor, blocks: Iterable[tuple[int, torch.Tensor]],
                      weight: float, fresh: bool) -> None:  # fmt: skip
    """``into[offset : offset + b] (+)= weight * block @ queries.T`` for each ``(offset, block)``.

    The product is taken in the wider dtype of the block and the queries (fp32 for
    stored features), with the training rows as the long side (``(b, D) @ (D, Q)``,
    which BLAS splits well for few queries), and added to contiguous rows of ``into``.

    Args:
        into: ``(n, Q)`` CPU tensor (float32 or float64), one row per training example.
        queries: ``(Q, D)`` query rows.
        blocks: ``(offset, (b, D))`` training-feature blocks.
        weight: the member weight.
        fresh: write instead of add (``into`` may hold anything: no pass to zero it
            first); rows no block covers are set to 0.
    """
    covered = []
    for offset, feats in blocks:
        dt = torch.promote_types(feats.dtype, queries.dtype)  # a float32 store of a float64 model
        a, q = feats.to(dt), queries.to(feats.device, dt)
        rows = into[offset : offset + feats.shape[0]]
        if a.device == into.device and dt == into.dtype:  # the product is written (or added) in place
            if fresh:
                torch.mm(a, q.T, out=rows)
                if weight != 1.0:
                    rows.mul_(weight)
            else:
                rows.addmm_(a, q.T, alpha=weight)
        elif fresh:
            torch.mul((a @ q.T).cpu(), weight, out=rows)
        else:
            rows.add_((a @ q.T).cpu(), alpha=weight)
        if fresh:
            covered.append((offset, offset + feats.shape[0]))
    if fresh:
        at = 0
        for lo, hi in sorted(covered) + [(into.shape[0], into.shape[0])]:
            if lo > at:
                into[at:lo] = 0
            at = max(at, hi)


def top_k_blocked(
    queries: Sequence[torch.Tensor],
    blocks: Sequence[Iterable[tuple[int, torch.Tensor]]],
    weights: Sequence[float],
    k: int,
    largest: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` training rows for each query row of the ensemble score
    ``S[j, i] = sum_m w_m queries[m][j] . F_m[i]``, one block of rows at a time.

    Args:
        queries: per member ``(Q, D_m)`` query rows.
        blocks: per member ``(offset, (b, D_m))`` feature blocks, the same offsets and
            sizes for every member (rows absent from them are not candidates).
        weights: per member weight ``w_m``.
        largest: ``True`` for the highest scores, ``False`` for the lowest.
        dtype: of the products and sums (float64 for a float64 model, as ``pairwise``).

    Returns:
        ``(scores, indices)``, each ``(Q, min(k, rows seen))``; indices are absolute
        row numbers, scores are sums in ``dtype``, sorted best first.
    """
    n_q = queries[0].shape[0]
    qs = [q.to(dtype) for q in queries]
    best_s = torch.empty(0, n_q, dtype=dtype)  # (candidates, Q): the training rows as the long side
    best_i = torch.empty(0, n_q, dtype=torch.long)
    for group in zip(*blocks, strict=True):
        s, b = group[0][0], group[0][1].shape[0]
        if any(o != s or f.shape[0] != b for o, f in group):
            raise RuntimeError(f"the members' feature blocks differ at row {s}")
        block = torch.zeros(b, n_q, dtype=dtype)
        for q, (_, f), w in zip(qs, group, weights):
            block.addmm_(f.to(dtype), q.T, alpha=float(w))  # (b, D) @ (D, Q): BLAS splits the long side
        cand_s = torch.cat([best_s, block])
        cand_i = torch.cat([best_i, torch.arange(s, s + b)[:, None].expand(-1, n_q)])
        best_s, pos = torch.topk(cand_s, min(k, cand_s.shape[0]), dim=0, largest=largest, sorted=True)
        best_i = torch.gather(cand_i, 0, pos)
    return best_s.T.contiguous(), best_i.T.contiguous()


def merge_top_k(parts: Iterator[tuple[torch.Tensor, torch.Tensor]], k: int, largest: bool = True):
    """Merge per-shard ``(scores, indices)`` top-k lists into one exact top-k."""
    parts = list(parts)
    scores = torch.cat([p[0] for p in parts], dim=1)
    idx = torch.cat([p[1] for p in parts], dim=1)
    kk = min(k, scores.shape[1])
    best, pos = torch.topk(scores, kk, dim=1, largest=largest, sorted=True)
    return best, torch.gather(idx, 1, pos)
