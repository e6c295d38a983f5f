"""Fingerprints a store records to recognise its model, data and losses."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..data import new_hash, update_hash

LOSS_RTOL = 1e-4
"""Relative tolerance of the stored examples' losses (float rounding on another device passes)."""


def fingerprint_tensors(named: dict[str, torch.Tensor]) -> str:
    """Hash of names, shapes, dtypes and values of a dict of tensors."""
    h = new_hash()
    for k in sorted(named):
        h.update(f"{k}|".encode())
        update_hash(h, named[k])
    return h.hexdigest()[:32]


def fingerprint_data(source, samples: int = 64) -> str:
    """Hash of the size and of ``samples`` evenly spaced examples of a DataSource
    (:meth:`hessfree.data.DataSource.fingerprint`)."""
    return source.fingerprint(samples)


def rounded_losses(values: Any, digits: int = 7) -> list[float]:
    """Per-example losses rounded to ``digits`` significant digits (stored in the config)."""
    out = []
    for v in np.asarray(values, dtype=np.float64).reshape(-1):
        out.append(float(f"{v:.{digits}g}") if math.isfinite(v) else repr(float(v)))
    return out


def losses_match(a: Any, b: Any) -> bool:
    if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)):
        return a == b
    try:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        return a == b
    scale = max(float(np.max(np.abs(x), initial=0.0)), float(np.max(np.abs(y), initial=0.0)))
    return bool(np.all(np.abs(x - y) <= LOSS_RTOL * np.maximum(np.abs(x), np.abs(y)) + 1e-9 * scale + 1e-12))
