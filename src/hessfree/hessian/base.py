"""The interface shared by the inverse-Hessian comparators.

An :class:`InverseHessian` turns vectors ``v`` (target gradients, test-example
gradients) into ``(H + lambda I)^{-1} v`` for one member, where ``H`` is the
Hessian of the MEAN training loss over the data the estimator was fitted on
(see :mod:`hessfree.hessian.hvp`). The estimator then takes inner products
with the per-example training gradients, so that

    score_i = grad l(z_i)^T (H + lambda I)^{-1} grad f

which keeps the library's sign (positive = the example helps: lowers f).
Units: ``score_i / n`` is the first-order INCREASE of f when example i is
removed from the n training examples and the model is retrained to the optimum
(equivalently ``score_i`` is the decrease of f per unit of extra weight on
example i's loss in the mean objective). This is the classic influence
function with the opposite sign, ``score_i = -n * I_up,loss(z_i, f)`` in Koh
and Liang's notation with H of the mean loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .hvp import Objective

if TYPE_CHECKING:
    from ..influence import Influence
    from ..members import MemberView


class InverseHessian:
    """Base class: ``solve`` maps ``(k, D)`` vectors to ``(H + damping I)^{-1}`` times them.

    Attributes:
        report: one dict per member (keyed by member name) describing the last
            solve (iterations, residuals, eigenvalues, ... depending on the method).
    """

    name = "inverse-hessian"

    def __init__(self, damping: float | None = None):
        if damping is not None and (not np.isfinite(damping) or damping < 0):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        self.damping = damping
        self.report: dict[str, dict[str, Any]] = {}
        self._state: dict[str, Any] = {}

    @property
    def lam(self) -> float:
        return 0.0 if self.damping is None else float(self.damping)

    def reset(self) -> None:
        """Forget cached factorizations (called by ``Influence.fit``)."""
        self.report, self._state = {}, {}

    def objective(self, est: Influence, view: MemberView, names: list[str]) -> Objective:
        """The member's training objective, kept (with its gradient graphs) between solves."""
        key = ("objective", view.name)
        if key not in self._state:
            self._state[key] = Objective(view, names, est.source, est.device)
        return self._state[key]

    def solve(self, est: Influence, view: MemberView, names: list[str], vectors: torch.Tensor) -> torch.Tensor:
        """``(H + damping I)^{-1} v`` for each row of ``vectors`` ``(k, D)``; float32 ``(k, D)``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's settings (saved with results)."""
        return {"method": self.name, "damping": self.damping}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "method")
        return f"{type(self).__name__}({args})"


def member_index(est: Influence, view: MemberView) -> int:
    names = [s.name for s in est._specs]
    return names.index(view.name)


def target_directions(est: Influence, target: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each member: the target gradient ``grad f`` ``(D,)`` and the direction the
    estimator takes inner products with, ``(H + damping I)^{-1} grad f`` ``(D,)``
    (``grad f`` itself for the identity). The angle between the two says how far
    the identity-Hessian scores are from the Hessian-based ones."""
    from ..gradients.functional import flatten

    est._check_fitted()
    target.validate(est.task)
    out = []
    for m, view in est._views():
        names = est._names[m]
        g = flatten(target.gradient(view, names), names).float()
        q = est._query(view, names, g)
        out.append((g.double().cpu().numpy(), q.double().cpu().numpy()))
    return out


def self_influence(est: Influence, solver: InverseHessian) -> np.ndarray:
    """``w_m * g_i^T (H_m + damping I)^{-1} g_i`` for every member and training example,
    ``(n_members, n_train)``."""
    rows = np.zeros((len(est._specs), est.n_train))
    for m, view in est._views():
        names = est._names[m]
        for offset, feats in est._train_features(m, view):
            solved = solver.solve(est, view, names, feats).to(feats.device)
            rows[m, offset : offset + feats.shape[0]] = view.weight * (solved * feats).sum(1).double().cpu().numpy()
    return rows
