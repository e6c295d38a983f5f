"""The explicit damped Hessian, inverted through its eigendecomposition."""

from __future__ import annotations

import torch

from .._checks import integer
from .base import InverseHessian, query_dtype


class Exact(InverseHessian):
    """Builds ``H`` (``D x D``, float64) from ``D`` Hessian-vector products and solves
    with its eigendecomposition ``H = V diag(e) V^T``: ``(V diag(1/(e + damping)) V^T) v``.

    Meant for models (or parameter selections) of up to a few thousand
    parameters: memory ``8 D^2`` bytes, time ``D`` Hessian-vector products.
    A non-convex model's Hessian may be indefinite; the report gives its
    smallest eigenvalue and whether ``H + damping I`` is positive definite.

    Args:
        damping: ``lambda >= 0`` added to the diagonal (default 0).
        max_dim: refuse selections larger than this (a ``ValueError`` names the size).
        chunk: basis vectors per vectorised Hessian-vector product.
    """

    name = "exact"

    def __init__(self, damping: float | None = None, max_dim: int = 6000, chunk: int = 64):
        super().__init__(damping)
        self.max_dim, self.chunk = integer(max_dim, "max_dim"), integer(chunk, "chunk")

    def options(self):
        return {**super().options(), "max_dim": self.max_dim}

    def check_dims(self, dims: list[int]) -> None:
        """Refuse a selection above ``max_dim`` when ``fit`` starts, before any gradient."""
        for d in dims:
            self._check_dim(d)

    def _check_dim(self, d: int) -> None:
        if d > self.max_dim:
            raise ValueError(
                f"hessian='exact' needs the {d} x {d} Hessian ({8 * d**2 / 1e9:.2f} GB); "
                f"that is above max_dim={self.max_dim}. Use hessian='cg' or 'lissa', select fewer "
                "parameters (params='last'), or raise max_dim"
            )

    def factor(self, member) -> tuple[torch.Tensor, torch.Tensor]:
        if member.name not in self._state:
            obj = self.objective(member)
            self._check_dim(obj.dim)
            h = obj.hessian(self.chunk)
            evals, evecs = torch.linalg.eigh(h)
            shifted = evals + self.lam
            self.report[member.name] = {
                "method": self.name,
                "dim": obj.dim,
                "damping": self.lam,
                "min_eigenvalue": float(evals[0]),
                "max_eigenvalue": float(evals[-1]),
                "positive_definite": bool(shifted[0] > 0),
                "condition_number": float(shifted.abs().max() / shifted.abs().min().clamp_min(1e-300)),
            }
            # Hessian-vector products carry the model's rounding: below this, an eigenvalue is noise
            floor = obj.dim * torch.finfo(obj.dtype).eps * float(shifted.abs().max())
            if float(shifted.abs().min()) <= floor:
                raise ValueError(
                    f"member {member.name!r}: H + damping*I is singular to the model's precision (damping="
                    f"{self.lam:g}; its smallest |eigenvalue| {float(shifted.abs().min()):.3g} is within rounding of "
                    f"its largest, {float(shifted.abs().max()):.3g}); pass damping > 0, e.g. "
                    f"{1e-3 * float(evals.abs().max()):.3g} (1e-3 x the largest eigenvalue of H)"
                )
            self._state[member.name] = (evecs, shifted)
        return self._state[member.name]

    def matrix(self, member) -> torch.Tensor:
        """The damped Hessian ``H + damping I`` itself, ``(D, D)`` float64."""
        evecs, shifted = self.factor(member)
        return (evecs * shifted) @ evecs.T

    def solve(self, member, vectors):
        evecs, shifted = self.factor(member)
        v = vectors.to(evecs.device, torch.float64)
        return query_dtype(((v @ evecs) / shifted) @ evecs.T, vectors)
