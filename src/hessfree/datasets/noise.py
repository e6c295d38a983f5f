"""Label-noise injection with the true mask returned."""

from __future__ import annotations

from typing import Any

import numpy as np


def flip_labels(
    labels: Any,
    rate: float,
    n_classes: int | None = None,
    seed: int = 0,
    kind: str = "symmetric",
    mapping: dict[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(rate * n)`` labels.

    Args:
        labels: ``(n,)`` integer labels.
        rate: share of labels to flip, in [0, 1].
        n_classes: number of classes (default ``max(labels) + 1``).
        kind: ``"symmetric"`` (a flipped label becomes a uniformly drawn OTHER
            class) or ``"asymmetric"`` (class-dependent: ``mapping[c]``, default
            ``c -> (c + 1) % n_classes``; only examples of classes in the mapping
            are eligible).

    Returns:
        ``(noisy_labels, flipped)``: the new labels and the boolean ``(n,)``
        mask of the examples whose label was changed.
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    n = y.shape[0]
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    k = int(n_classes if n_classes is not None else y.max() + 1)
    if k < 2:
        raise ValueError(f"label flipping needs at least 2 classes, got n_classes={k}")
    rng = np.random.default_rng(seed)
    if kind == "symmetric":
        eligible = np.arange(n)
    elif kind == "asymmetric":
        mapping = mapping if mapping is not None else {c: (c + 1) % k for c in range(k)}
        eligible = np.flatnonzero(np.isin(y, list(mapping)))
    else:
        raise ValueError(f"kind must be 'symmetric' or 'asymmetric', got {kind!r}")
    m = int(round(rate * n))
    if m > len(eligible):
        raise ValueError(f"cannot flip {m} labels: only {len(eligible)} examples are eligible")
    chosen = rng.choice(eligible, size=m, replace=False)
    noisy = y.copy()
    if kind == "symmetric":
        shift = rng.integers(1, k, size=m)
        noisy[chosen] = (y[chosen] + shift) % k
    else:
        noisy[chosen] = np.array([mapping[int(c)] for c in y[chosen]])
    flipped = noisy != y
    return noisy, flipped
