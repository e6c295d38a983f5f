"""The suspicion scores behind ``find_noisy_labels(method=...)``: self-influence, the
utility of a held-out set, class-centred and combined scores, and the automatic choice."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..output_space import output_self_influence
from ..targets import Utility
from ..task import Task

# The smallest class whose self-influence is centred on its median. With 5 examples the median is
# the third largest score, so up to two flips in the class cannot set it; with 2 the median is the
# mean of both (a flip keeps half its lead) and with 1 it is the example itself (centred to 0).
MIN_CENTRED_CLASS = 5


def _z(a: np.ndarray) -> np.ndarray:
    sd = a.std()
    return (a - a.mean()) / sd if sd > 0 else a - a.mean()


def _small_classes(y: np.ndarray) -> list[int]:
    """The labels given to fewer than ``MIN_CENTRED_CLASS`` examples (not centred)."""
    classes, counts = np.unique(y, return_counts=True)
    return [int(c) for c, k in zip(classes, counts) if k < MIN_CENTRED_CLASS]


def _class_centred(score: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``score`` minus its median over the examples with the same label, for the
    classes with at least ``MIN_CENTRED_CLASS`` examples (the others as they are)."""
    out = score.astype(float).copy()
    small = set(_small_classes(y))
    for c in np.unique(y):
        if int(c) not in small:
            m = y == c
            out[m] -= np.median(score[m])
    return out


def _top_overlap(a: np.ndarray, b: np.ndarray, share: float = 0.1) -> float:
    """Share of the ``share`` highest of ``a`` that are also among the highest of ``b``."""
    k = max(1, int(round(share * len(a))))
    top = lambda v: set(np.argsort(-v, kind="stable")[:k].tolist())  # noqa: E731
    return len(top(a) & top(b)) / k


def _forward_kwargs(influence_kwargs: dict) -> dict:
    """The ``influence_kwargs`` that the forward-only passes of :mod:`hessfree.output_space` take too."""
    return {key: v for key, v in influence_kwargs.items() if key in ("batch_size", "device", "progress")}


def _auto(est: Any, val: tuple, train: tuple, task: Task, members: Any, influence_kwargs: dict):
    """Choose between ``self`` and ``class_utility`` (see the module docstring)."""
    own, own_rows = _suspicion(est, "self", val, train, task, members, influence_kwargs)
    pair = est().pairwise(val, reduce=None)  # (M, n_val, n), once for both validation scores
    cls, cls_rows = _class_utility(pair, val)
    util = -pair.sum(0).mean(0)  # minus the influence on the mean validation loss (= "utility")
    raw = own_rows.sum(0)  # before the class centring, which already lifts part of a systematic flip
    diag = {"overlap_class_utility_utility": _top_overlap(cls, util), "overlap_class_utility_self": _top_overlap(cls, raw)}
    if diag["overlap_class_utility_utility"] > diag["overlap_class_utility_self"]:
        return cls, cls_rows, "auto -> class_utility", diag
    # no sign of systematic noise: the class centring (a hedge against it) is not needed
    return raw, own_rows, "auto -> self, not centred", diag


def _suspicion(est: Any, method: str, val: tuple | None, train: tuple, task: Task, members: Any,
               influence_kwargs: dict) -> tuple[np.ndarray, np.ndarray]:
    """Suspicion ``(n,)`` and per-member suspicion rows ``(M, n)``; ``est()``
    returns the fitted estimator (built on first use)."""
    if method == "self":
        rows = output_self_influence(task, train, members, reduce=None, **_forward_kwargs(influence_kwargs))
        y = train[1].reshape(-1).cpu().numpy()
        return _class_centred(rows.sum(0), y), rows
    if method == "self_weights":
        rows = est().self_influence(reduce=None)
        rows = np.log(np.maximum(rows, np.finfo(float).tiny))
        return rows.mean(0), rows
    if method == "combined":
        own, own_rows = _suspicion(est, "self", val, train, task, members, influence_kwargs)
        cls, _ = _suspicion(est, "class_utility", val, train, task, members, influence_kwargs)
        return _z(own) + _z(cls), own_rows
    if val is None:
        raise ValueError(f"method={method!r} needs validation data: pass val=(X_val, y_val), or use method='self'")
    if method == "utility":
        rows = -est().influence(Utility(val), reduce=None)
        return rows.sum(0), rows
    return _class_utility(est().pairwise(val, reduce=None), val)


def _class_utility(pair: np.ndarray, val: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Minus the worst per-class mean influence, from pairwise scores ``(M, n_val, n)``."""
    yv = val[1].reshape(-1).cpu().numpy()
    classes = np.unique(yv)
    per_class = np.stack([pair[:, yv == c].mean(1) for c in classes], axis=1)  # (M, C, n)
    rows = -per_class.min(1)
    return -per_class.sum(0).min(0), rows
