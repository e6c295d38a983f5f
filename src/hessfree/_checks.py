"""Checks of integer arguments shared by the public API.

Every integer option (sizes, counts, k, seeds) accepts a Python ``int``, a
numpy integer (``np.arange`` and array shapes give those) or a 0-d integer
array or tensor (``(y == 1).sum()``) and refuses booleans,
floats (``2.5`` and ``2.0`` alike: a size is never rounded silently), strings
and values out of range, with a ``ValueError`` that names the argument and the
value it got.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np


def _bool_or_text(value: Any) -> bool:
    """Booleans (Python, numpy or torch) and strings: never a number here, though ``True`` is an int."""
    return isinstance(value, (bool, np.bool_, str, bytes)) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def is_integer(value: Any) -> bool:
    """True for ``int``, numpy integers and 0-d integer arrays / tensors; False for booleans
    and everything else."""
    if _bool_or_text(value):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def integer(value: Any, name: str, minimum: int | None = 1, maximum: int | None = None, note: str = "") -> int:
    """``value`` as a Python ``int`` when it is an integer in ``[minimum, maximum]``.

    Raises:
        ValueError: ``value`` is not an integer (bools and floats included) or is
            out of range; the message names ``name``, the range and ``value``
            (and ``note``, e.g. what the bound means, when given).
    """
    ok = is_integer(value)
    if ok:
        out = operator.index(value)
        ok = (minimum is None or out >= minimum) and (maximum is None or out <= maximum)
    if not ok:
        if minimum == 1 and maximum is None:
            want = "a positive integer"
        elif maximum is None:
            want = f"an integer >= {minimum}" if minimum is not None else "an integer"
        elif minimum is None:
            want = f"an integer <= {maximum}"
        else:
            want = f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {want}{note}, got {value!r}")
    return int(out)


def number(value: Any, name: str, minimum: float | None = None, *, above: bool = False) -> float:
    """``value`` as a finite ``float`` (ints and numpy numbers too, not bools or strings) that is
    ``>= minimum`` (``> minimum`` with ``above=True``); else ``ValueError`` naming ``name`` and ``value``."""
    ok = not _bool_or_text(value)
    try:
        out = float(value) if ok else float("nan")  # numbers, and 0-d arrays / tensors
    except (TypeError, ValueError, RuntimeError):
        ok, out = False, float("nan")
    if not (ok and np.isfinite(out) and (minimum is None or (out > minimum if above else out >= minimum))):
        bound = "" if minimum is None else f" {'>' if above else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return out
