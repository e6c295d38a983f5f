"""Act on influence scores: remove, relabel or reweight training examples.

All functions take scores in the library's convention (positive = the example
helps the target), so the most NEGATIVE scores are treated as the most
harmful. For self-influence, where large values are suspicious, pass ``-si``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._checks import integer
from .training import train


def _scores(scores: Any) -> np.ndarray:
    arr = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"scores must be one value per training example, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
        raise ValueError(f"scores contain NaN or inf at indices {bad}")
    return arr


def _how_many(n: int, fraction: float | None, count: int | None) -> int:
    """``count``, or ``fraction * n`` rounded to the nearest count (as the command line does)."""
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction= (share of the training set) or count= (number of examples)")
    if fraction is not None:
        if not (isinstance(fraction, (int, float, np.number)) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        k = int(round(fraction * n))
        if k == 0 and fraction > 0:
            raise ValueError(f"fraction={fraction:g} of {n} examples is {fraction * n:g}, which rounds to 0 examples; "
                             "pass a larger fraction or count=1")  # fmt: skip
        return k
    return integer(count, "count", 0, n)


def most_harmful(scores: Any, fraction: float | None = None, count: int | None = None) -> np.ndarray:
    """Indices of the lowest-scoring examples, most harmful first, ``(k,)``.
    Ties are broken by index, so the result is deterministic."""
    s = _scores(scores)
    k = _how_many(len(s), fraction, count)
    return np.argsort(s, kind="stable")[:k]


def remove(scores: Any, fraction: float | None = None, count: int | None = None) -> np.ndarray:
    """Indices to remove: the ``fraction`` (or ``count``) most harmful examples."""
    return most_harmful(scores, fraction, count)


def keep_mask(n: int, removed: Any) -> np.ndarray:
    """Boolean ``(n,)`` mask that is False at the removed examples.

    Args:
        removed: indices in ``[0, n)`` (as from :func:`remove`), or a boolean
            ``(n,)`` mask that is True at the examples to remove.

    Raises:
        ValueError: indices out of range (negative ones too: ``-1`` would remove
            the last example), fractional, or a boolean mask of another length.
    """
    arr = np.asarray(removed.cpu() if isinstance(removed, torch.Tensor) else removed)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"a boolean remove mask needs one entry per example ({n}), got shape {arr.shape}")
        return ~arr
    arr = arr.reshape(-1)
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.all(arr == np.round(arr))):
        raise ValueError(f"indices to remove must be integers, got {arr[:5].tolist()}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(f"indices to remove must be in [0, {n}), got {bad[:5].tolist()}")
    mask = np.ones(n, dtype=bool)
    mask[arr] = False
    return mask


def relabel(
    scores: Any,
    labels: Any,
    new_labels: Any,
    fraction: float | None = None,
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace the labels of the most harmful examples.

    Args:
        scores: ``(n,)`` influence scores.
        labels: ``(n,)`` current labels.
        new_labels: ``(n,)`` candidate labels (for example the model's
            predictions, or the label under which each example helps most).

    Returns:
        ``(indices, relabelled)``: the changed indices and a copy of ``labels``
        with them replaced.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).copy()
    new_labels = np.asarray(new_labels.cpu() if isinstance(new_labels, torch.Tensor) else new_labels)
    if labels.shape != new_labels.shape or labels.shape[0] != len(_scores(scores)):
        raise ValueError(
            f"scores ({len(_scores(scores))}), labels {labels.shape} and new_labels {new_labels.shape} must align"
        )
    idx = most_harmful(scores, fraction, count)
    labels[idx] = new_labels[idx]
    return idx, labels


def reweight(
    scores: Any,
    method: str = "softmax",
    tau: float = 1.0,
    factor: float = 4.0,
    max_weight: float = 2.0,
    strength: float = 0.5,
) -> np.ndarray:
    """Sample weights ``(n,)`` that favour helpful examples.

    With ``z`` the z-scored influence:

    * ``"softmax"`` (the seed paper's): ``w = clip(factor * N * softmax(z / tau), 0, max_weight)``;
    * ``"linear"`` (plain): ``w = clip(1 + strength * z, 0, max_weight)``.
    """
    s = _scores(scores)
    std = s.std()
    z = (s - s.mean()) / std if std > 0 else np.zeros_like(s)
    if method == "softmax":
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        a = z / tau
        soft = np.exp(a - a.max())
        soft /= soft.sum()
        w = factor * len(s) * soft
    elif method == "linear":
        w = 1.0 + strength * z
    else:
        raise ValueError(f"method must be 'softmax' or 'linear', got {method!r}")
    return np.clip(w, 0.0, max_weight)


def retrain(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    remove: Any = None,
    weights: Any = None,
    labels: Any = None,
    seed: int = 0,
    **train_kwargs,
) -> nn.Module:
    """Train a fresh model (``torch.manual_seed(seed); make_model()``) after curation.

    Args:
        remove: indices to drop, or a boolean ``(n,)`` mask (True = drop); see :func:`keep_mask`.
        weights: ``(n,)`` sample weights.
        labels: ``(n,)`` replacement labels (for relabelling).
        **train_kwargs: passed to :func:`hessfree.training.train`.
    """
    y = torch.as_tensor(labels) if labels is not None else y
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{'labels' if labels is not None else 'y'} has {y.shape[0]} entries for {x.shape[0]} examples")
    mask = keep_mask(x.shape[0], remove if remove is not None else [])
    idx = torch.from_numpy(np.flatnonzero(mask))
    data = [x[idx], y[idx].to(y.dtype)]
    if weights is not None:
        w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"weights has {w.shape[0]} entries for {x.shape[0]} examples")
        data.append(w[idx])
    torch.manual_seed(seed)
    model = make_model()
    train(model, tuple(data), seed=seed, **train_kwargs)
    return model
