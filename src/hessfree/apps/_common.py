"""Helpers shared by the applications."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_tensor(a: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t.to(dtype) if dtype is not None else t


def split_xy(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` tensors of a tuple ``(X, y)`` / ``(X, y, w)``."""
    if not isinstance(data, (tuple, list)) or len(data) < 2:
        raise TypeError(
            f"{what} must be a tuple (X, y) of tensors or arrays, got {type(data).__name__}; "
            "the applications retrain models, so they need the data as arrays"
        )
    x, y = as_tensor(data[0]), as_tensor(data[1])
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: X has {x.shape[0]} rows but y has {y.shape[0]}; pass one label per example")
    if x.is_floating_point():
        x = x.float()
    return x, y


def percentile_ranks(rows: np.ndarray) -> np.ndarray:
    """Rank of each entry within its row, scaled to [0, 1] (0 = lowest), ``rows.shape``."""
    rows = np.atleast_2d(rows)
    order = rows.argsort(axis=1, kind="stable")
    ranks = np.empty_like(order, dtype=float)
    n = rows.shape[1]
    np.put_along_axis(ranks, order, np.arange(n, dtype=float)[None, :].repeat(rows.shape[0], 0), axis=1)
    return ranks / max(n - 1, 1)


def check_fraction(fraction: float, name: str = "fraction") -> float:
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    return float(fraction)
