"""Query transforms: the interface between the estimator and any curvature correction.

A :class:`QueryTransform` maps query vectors (a target gradient, test-example
gradients) of one member to the vectors the estimator takes inner products
with. It never sees the estimator: everything it may read about a member comes
in a :class:`MemberInputs` (the member's name and index, the number of training
examples, the selected parameters, a callable streaming this rank's training
features block by block, and a callable building the training objective).

Two kinds exist, told apart by :attr:`QueryTransform.space`:

* ``"parameters"``: applied to flat gradients BEFORE any projection (the
  inverse-Hessian comparators :class:`~hessfree.hessian.Exact`, ``CG``,
  ``LiSSA``, ``DataInf``; they need exact per-example gradients);
* ``"features"``: applied to feature vectors AFTER projection
  (:class:`~hessfree.hessian.EmpiricalFisher`; works with projections and stores).

An :class:`InverseHessian` turns vectors ``v`` into ``(H + lambda I)^{-1} v``
for one member, where ``H`` is the Hessian of the MEAN training loss over the
data the estimator was fitted on (see :mod:`hessfree.hessian.hvp`). The
estimator then takes inner products with the per-example training gradients, so
that

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

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import number
from .hvp import Objective

BlockStream = Callable[[], Iterator[tuple[int, torch.Tensor]]]
"""A callable returning ``(offset, (b, D))`` training-feature blocks (this rank's rows)."""


@dataclass(frozen=True)
class MemberInputs:
    """What a query transform may read about one member (built by the estimator).

    Attributes:
        name: the member's name (the key of :attr:`QueryTransform.report`).
        index: the member's row in ``reduce=None`` results.
        n_train: number of training examples ``n`` (all ranks together).
        params: ``(name, numel)`` of the selected parameters, in flat-gradient order.
        dim: length of the member's feature vectors.
        train_blocks: streams this rank's training features ``(offset, (b, dim))``;
            under torch.distributed a transform sums over ranks itself.
        objective: builds the member's training :class:`Objective` (``None`` when
            the training data are not at hand, e.g. a store reopened without data).
        train_weights: the training examples' sample weights ``(n,)`` float64
            (``None``: unweighted data), indexed like the offsets of ``train_blocks``.
    """

    name: str
    index: int
    n_train: int
    params: tuple[tuple[str, int], ...]
    dim: int
    train_blocks: BlockStream
    objective: Callable[[], Objective] | None = None
    train_weights: Callable[[], np.ndarray | None] = lambda: None

    def fisher_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, rows)`` whose outer products sum to ``n`` times the empirical
        Fisher of the training objective ``(1/n) sum_i w_i l_i``:
        ``sum_i w_i g_i g_i^T`` with ``g_i`` the gradient of ``l_i``. The features
        are ``phi_i = grad(w_i l_i) = w_i g_i``, so each row is ``phi_i / sqrt(w_i)``
        (0 where ``w_i = 0``), in float64; without sample weights the features
        themselves. A uniform weight ``c`` then scales the Fisher by ``c``, as it
        scales the Hessian, and curvature-corrected scores do not change.

        Raises:
            ValueError: a negative sample weight (the weighted loss has no Fisher).
        """
        w = self.train_weights()
        if w is None:
            yield from self.train_blocks()
            return
        if bool((w < 0).any()):
            i = int(np.argmax(w < 0))
            raise ValueError(f"training example {i} has sample weight {w[i]:g}; the empirical Fisher of the weighted "
                             "loss needs weights >= 0 (use hessian='cg' or 'exact', or drop the example)")  # fmt: skip
        root = np.sqrt(w)
        inv = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
        for offset, f in self.train_blocks():
            scale = torch.from_numpy(inv[offset : offset + f.shape[0]]).to(f.device)
            yield offset, f.double() * scale[:, None]


class QueryTransform:
    """Base class of query transforms (identity, curvature corrections).

    Subclasses implement :meth:`transform`; :meth:`check_dims` may refuse
    feature sizes before any long work starts.

    Attributes:
        space: ``"parameters"`` (applied to flat gradients before projection) or
            ``"features"`` (applied to feature vectors after projection).
        collective: ``True`` when :meth:`transform` is a collective call under
            torch.distributed (every rank must pass the same vectors).
        report: one dict per member (keyed by member name) describing the last
            preparation or solve.
    """

    name = "transform"
    space = "features"
    collective = False

    def __init__(self) -> None:
        self.report: dict[str, dict[str, Any]] = {}
        self._state: dict[Any, Any] = {}

    def reset(self) -> None:
        """Forget cached factorizations (called by ``Influence.fit``)."""
        self.report, self._state = {}, {}

    def check_dims(self, dims: list[int]) -> None:
        """Raise ``ValueError`` when a member's feature size is unsupported (called
        after the members are set up, before any gradient is computed)."""

    def prepare(self, member: MemberInputs) -> None:
        """Precompute what every later query of ``member`` reuses (called at the end of
        ``fit``; a collective call under torch.distributed). Default: nothing."""

    def transform(self, member: MemberInputs, vectors: torch.Tensor) -> torch.Tensor:
        """Map query rows ``(Q, D)`` of ``member`` to ``(Q, D)`` (float32, or float64 for float64 input)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's settings (saved with results)."""
        return {"method": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "method")
        return f"{type(self).__name__}({args})"


class Identity(QueryTransform):
    """The identity: scores are plain inner products of (projected) gradients."""

    name = "identity"

    def transform(self, member: MemberInputs, vectors: torch.Tensor) -> torch.Tensor:
        return vectors


class InverseHessian(QueryTransform):
    """Base class: ``solve`` maps ``(k, D)`` vectors to ``(H + damping I)^{-1}`` times them."""

    name = "inverse-hessian"
    space = "parameters"

    def __init__(self, damping: float | None = None):
        super().__init__()
        self.damping = None if damping is None else number(damping, "damping", 0)

    @property
    def lam(self) -> float:
        return 0.0 if self.damping is None else float(self.damping)

    def objective(self, member: MemberInputs) -> Objective:
        """The member's training objective, kept (with its gradient graphs) between solves."""
        key = ("objective", member.name)
        if key not in self._state:
            if member.objective is None:
                raise ValueError(f"hessian={self.name!r} needs the training data; call est.fit(train) with them")
            self._state[key] = member.objective()
        return self._state[key]

    def solve(self, member: MemberInputs, vectors: torch.Tensor) -> torch.Tensor:
        """``(H + damping I)^{-1} v`` for each row of ``vectors`` ``(k, D)``: ``(k, D)`` float64 for
        float64 vectors (a float64 model), else float32."""
        raise NotImplementedError

    def transform(self, member: MemberInputs, vectors: torch.Tensor) -> torch.Tensor:
        return self.solve(member, vectors)

    def options(self) -> dict[str, Any]:
        return {"method": self.name, "damping": self.damping}


def query_dtype(out: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``out`` (a solve's float64 result) in the queries' precision: float64 for float64
    ``vectors`` (a float64 model), else float32."""
    return out.to(torch.float64 if vectors.dtype == torch.float64 else torch.float32)


def target_directions(est: Any, target: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each member: the target gradient and the direction the estimator takes
    inner products with. Same as ``est.target_directions(target)`` (see
    :meth:`hessfree.Influence.target_directions`)."""
    return est.target_directions(target)


def self_influence(est: Any, solver: QueryTransform | None = None) -> np.ndarray:
    """``w_m * g_i^T T_m g_i`` for every member and training example,
    ``(n_members, n_train)``, with ``T_m`` the estimator's own query transform.
    Same as ``est.self_influence(reduce=None)``."""
    if solver is not None and solver is not est.hessian:
        raise ValueError("self_influence(est, solver) uses the estimator's own transform; pass solver=None "
                         "or build the estimator with hessian=solver")
    return est.self_influence(reduce=None)
