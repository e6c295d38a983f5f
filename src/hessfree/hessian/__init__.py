"""Hessian-based comparators for studies and small models.

``hf.Influence(task, hessian=...)`` accepts ``"identity"`` (the default: the
Hessian-free product), ``"exact"``, ``"cg"``, ``"lissa"``, ``"datainf"`` or an
instance of one of the classes below. Scores keep the library's sign
(positive = helps) and become ``grad l(z_i)^T (H + damping I)^{-1} grad f`` with
``H`` the Hessian of the MEAN training loss; ``score_i / n`` predicts the
increase of the target when example i is removed and the model retrained.
"""

from __future__ import annotations

from typing import Any

from .base import InverseHessian, self_influence, target_directions
from .datainf import DataInf
from .exact import Exact
from .hvp import Objective
from .iterative import CG, LiSSA

METHODS: dict[str, type[InverseHessian]] = {"exact": Exact, "cg": CG, "lissa": LiSSA, "datainf": DataInf}


def make_inverse_hessian(
    hessian: str | InverseHessian | None,
    damping: float | None = None,
    options: dict[str, Any] | None = None,
) -> InverseHessian | None:
    """The comparator for ``Influence(hessian=..., damping=..., hessian_options=...)``;
    ``None`` for the identity."""
    options = dict(options or {})
    if hessian is None or (isinstance(hessian, str) and hessian == "identity"):
        if damping is not None or options:
            raise ValueError(
                "damping= and hessian_options= only apply to a Hessian comparator; with hessian='identity' "
                "leave them unset (or choose hessian='exact', 'cg', 'lissa' or 'datainf')"
            )
        return None
    if isinstance(hessian, InverseHessian):
        if damping is not None or options:
            raise ValueError("pass damping and options to the comparator object itself, not to Influence")
        return hessian
    if not isinstance(hessian, str) or hessian not in METHODS:
        raise ValueError(
            f"hessian={hessian!r} is not understood; use 'identity', 'exact', 'cg', 'lissa', 'datainf' "
            "or an hf.hessian comparator instance"
        )
    try:
        return METHODS[hessian](damping=damping, **options)
    except TypeError as e:
        raise TypeError(f"hessian_options for {hessian!r}: {e}") from e


__all__ = [
    "CG",
    "METHODS",
    "DataInf",
    "Exact",
    "InverseHessian",
    "LiSSA",
    "Objective",
    "make_inverse_hessian",
    "self_influence",
    "target_directions",
]
