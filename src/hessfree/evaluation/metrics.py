"""Detection and agreement metrics for score vectors (O(n log n), numpy only).

``scores`` here are suspicion scores: HIGHER = more suspicious. To evaluate
influence scores (positive = helps), pass their negation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import integer


def _pair(scores: Any, positives: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float).reshape(-1)
    raw = np.asarray(positives).reshape(-1)
    if raw.dtype != bool and not (raw.dtype.kind in "iuf" and np.isin(raw, (0, 1)).all()):
        other = raw[~np.isin(raw, (0, 1))][:3].tolist() if raw.dtype.kind in "iuf" else raw.dtype
        raise ValueError(f"positives must be booleans or 0 / 1 (1 = a positive, e.g. a flipped label), got {other}; "
                         "for labels such as -1 / 1 pass positives == 1")  # fmt: skip
    y = raw.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.shape[0]}) and positives ({y.shape[0]}) must have the same length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    return s, y


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    first = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = avg[group]
    return ranks


def roc_auc(scores: Any, positives: Any) -> float:
    """Area under the ROC curve: the probability that a random positive scores
    higher than a random negative (ties count one half)."""
    s, y = _pair(scores, positives)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs at least one positive and one negative")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: Any, positives: Any) -> float:
    """Average precision: sum over thresholds of (recall step) x precision,
    with tied scores forming one threshold."""
    s, y = _pair(scores, positives)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("average_precision needs at least one positive")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.cumsum(y_sorted)[last_of_tie]
    seen = (np.flatnonzero(last_of_tie) + 1).astype(float)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_step * tp / seen))


def recall_at_k(scores: Any, positives: Any, k: int | None = None, fraction: float | None = None) -> float:
    """Share of all positives found among the ``k`` (or ``fraction * n``)
    highest-scoring examples, in [0, 1]."""
    s, y = _pair(scores, positives)
    if (k is None) == (fraction is None):
        raise ValueError("give exactly one of k= or fraction=")
    if k is None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        k = int(round(fraction * len(s)))
    k = integer(k, "k", 0, len(s), note=" (the number of examples)")
    if y.sum() == 0:
        raise ValueError("recall_at_k needs at least one positive")
    top = np.argsort(-s, kind="mergesort")[:k]
    return float(y[top].sum() / y.sum())


# ---- agreement between score vectors -------------------------------------------------


def _two(a: Any, b: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=float).reshape(-1)
    y = np.asarray(b, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{what}: the two score vectors have lengths {x.shape[0]} and {y.shape[0]}; they must match")
    if x.shape[0] < 2:
        raise ValueError(f"{what} needs at least 2 values, got {x.shape[0]}")
    for name, v in (("first", x), ("second", y)):
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{what}: the {name} vector contains NaN or inf at {np.flatnonzero(~np.isfinite(v))[:5].tolist()}")
    return x, y


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two ``(n,)`` vectors, in [-1, 1]. A constant vector
    has no correlation and raises ``ValueError``."""
    x, y = _two(a, b, "pearson")
    x, y = x - x.mean(), y - y.mean()
    nx, ny = np.sqrt(x @ x), np.sqrt(y @ y)
    if nx == 0 or ny == 0:
        which = "first" if nx == 0 else "second"
        raise ValueError(f"pearson: the {which} vector is constant; the correlation is undefined")
    return float(np.clip((x @ y) / (nx * ny), -1.0, 1.0))


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two ``(n,)`` vectors (ties get their average
    rank), in [-1, 1]: 1 = the same ordering."""
    x, y = _two(a, b, "spearman")
    try:
        return pearson(_average_ranks(x), _average_ranks(y))
    except ValueError as e:
        raise ValueError(str(e).replace("pearson", "spearman")) from None


def sign_agreement(a: Any, b: Any) -> float:
    """Share of positions where the two vectors have the same sign (a zero agrees
    only with a zero), in [0, 1]. With influence scores: how often two methods
    agree on whether an example helps or hurts."""
    x, y = _two(a, b, "sign_agreement")
    return float(np.mean(np.sign(x) == np.sign(y)))


def cosine(a: Any, b: Any) -> float:
    """Cosine of the angle between two ``(n,)`` vectors, in [-1, 1]."""
    x, y = _two(a, b, "cosine")
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        raise ValueError("cosine: a zero vector has no direction")
    return float(np.clip((x @ y) / (nx * ny), -1.0, 1.0))



__all__ = [
    "average_precision",
    "cosine",
    "pearson",
    "recall_at_k",
    "roc_auc",
    "sign_agreement",
    "spearman",
]
