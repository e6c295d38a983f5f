"""Small image data sets that load offline."""

from __future__ import annotations

import numpy as np

from ._require import require


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits.

    Returns:
        ``(X, y)``: ``X`` float32 ``(1797, 64)`` with pixels scaled to [0, 1]
        (raw values 0..16 divided by 16), ``y`` int64 ``(1797,)`` in 0..9.
        Needs the ``data`` extra (scikit-learn).
    """
    sk = require("sklearn.datasets", "data", "scikit-learn")
    d = sk.load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
