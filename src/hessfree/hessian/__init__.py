"""Hessian-based comparators for studies and small models.

``hf.Influence(task, hessian=...)`` accepts ``"identity"`` (the default: the
Hessian-free product), ``"fisher"`` (the damped empirical Fisher of the stored, possibly
projected, features: :class:`EmpiricalFisher`), ``"exact"``, ``"cg"``,
``"lissa"``, ``"datainf"`` or an instance of one of the classes below. Scores
keep the library's sign (positive = helps) and become
``grad l(z_i)^T (H + damping I)^{-1} grad f`` with ``H`` the Hessian of the MEAN
training loss (or its empirical-Fisher approximation); ``score_i / n``
predicts the increase of the target when example i is removed and the model
retrained.

Every method is a :class:`QueryTransform`: it receives a :class:`MemberInputs`
(the member's training-feature blocks, its training objective) and never the
estimator.
"""

from __future__ import annotations

from typing import Any

from .base import Identity, InverseHessian, MemberInputs, QueryTransform, self_influence, target_directions
from .datainf import DataInf
from .exact import Exact
from .fisher import EmpiricalFisher
from .hvp import Objective
from .iterative import CG, LiSSA

METHODS: dict[str, type[QueryTransform]] = {
    "fisher": EmpiricalFisher,
    "exact": Exact,
    "cg": CG,
    "lissa": LiSSA,
    "datainf": DataInf,
}


def make_inverse_hessian(
    hessian: str | QueryTransform | None,
    damping: float | None = None,
    options: dict[str, Any] | None = None,
) -> QueryTransform | None:
    """The comparator for ``Influence(hessian=..., damping=..., hessian_options=...)``;
    ``None`` for the identity."""
    options = dict(options or {})
    if hessian is None or (isinstance(hessian, str) and hessian == "identity"):
        if damping is not None or options:
            raise ValueError(
                "damping= and hessian_options= only apply to a Hessian comparator; with hessian='identity' "
                "leave them unset (or choose hessian='fisher', 'exact', 'cg', 'lissa' or 'datainf')"
            )
        return None
    if isinstance(hessian, Identity):
        if damping is not None or options:
            raise ValueError("the identity takes no damping or options")
        return None
    if isinstance(hessian, QueryTransform):
        if damping is not None or options:
            raise ValueError("pass damping and options to the comparator object itself, not to Influence")
        return hessian
    if not isinstance(hessian, str) or hessian not in METHODS:
        raise ValueError(
            f"hessian={hessian!r} is not understood; use 'identity', 'fisher', 'exact', 'cg', 'lissa', 'datainf' "
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
    "EmpiricalFisher",
    "Exact",
    "Identity",
    "InverseHessian",
    "MemberInputs",
    "LiSSA",
    "Objective",
    "QueryTransform",
    "make_inverse_hessian",
    "self_influence",
    "target_directions",
]
