"""Matrix-free solvers: conjugate gradient and LiSSA, on Hessian-vector products."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .._checks import integer, number
from .base import InverseHessian, query_dtype


def _relative_residuals(obj, lam: float, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||(H + lam I) x - b|| / ||b||`` per row, with one (full-data) Hessian-vector product."""
    r = obj.hvp(x) + lam * x - b
    return r.norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)


class CG(InverseHessian):
    """Conjugate gradient on ``(H + damping I) x = v``, one CG per row, run together.

    Stops a row when its relative residual ``||(H + damping I) x - v|| / ||v||``
    falls below ``tol`` or after ``max_iter`` iterations (one full-data
    Hessian-vector product per iteration). CG needs ``H + damping I`` positive
    definite; on negative curvature a row stops and is reported.

    ``report[member]`` holds ``iterations`` (max over rows), ``relative_residual``
    (max over rows, recomputed with an extra Hessian-vector product, not the
    recursion's estimate), ``converged`` (every row met ``tol`` in the
    recursion) and ``negative_curvature``. Hessian-vector products run in the
    model's dtype, so for a float32 model the recomputed residual carries
    float32 rounding times the condition number: it can stay above ``tol``
    (1e-5 on a tiny GPT-2 with an indefinite ``H``) with ``converged`` true;
    compare the two in the report.

    Args:
        damping: ``lambda >= 0`` (default 0).
        max_iter: iteration cap per solve.
        tol: relative-residual tolerance.
    """

    name = "cg"

    def __init__(self, damping: float | None = None, max_iter: int = 200, tol: float = 1e-6):
        super().__init__(damping)
        self.max_iter, self.tol = integer(max_iter, "max_iter"), number(tol, "tol", 0, above=True)

    def options(self):
        return {**super().options(), "max_iter": self.max_iter, "tol": self.tol}

    def solve(self, member, vectors):
        obj = self.objective(member)
        lam = self.lam
        b = vectors.to(obj.device, torch.float64)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        bnorm = b.norm(dim=1)
        iters = torch.zeros(b.shape[0], dtype=torch.long)
        negative = torch.zeros(b.shape[0], dtype=torch.bool)
        active = rs.sqrt() > self.tol * bnorm
        for _ in range(self.max_iter):
            idx = torch.nonzero(active).reshape(-1)
            if idx.numel() == 0:
                break
            pa = p[idx]
            ap = obj.hvp(pa) + lam * pa
            curv = (pa * ap).sum(1)
            bad = curv <= 0
            if bool(bad.any()):
                negative[idx[bad.cpu()]] = True
                active[idx[bad.cpu()]] = False
                keep = ~bad
                idx, pa, ap, curv = idx[keep.cpu()], pa[keep], ap[keep], curv[keep]
                if idx.numel() == 0:
                    continue
            alpha = rs[idx] / curv
            x[idx] += alpha[:, None] * pa
            r[idx] -= alpha[:, None] * ap
            rs_new = (r[idx] * r[idx]).sum(1)
            p[idx] = r[idx] + (rs_new / rs[idx])[:, None] * pa
            rs[idx] = rs_new
            iters[idx.cpu()] += 1
            active[idx] = rs_new.sqrt() > self.tol * bnorm[idx]
        res = _relative_residuals(obj, lam, x, b)
        converged = not bool(active.any()) and not bool(negative.any())
        self.report[member.name] = {
            "method": self.name,
            "dim": obj.dim,
            "damping": lam,
            "rows": int(b.shape[0]),
            "iterations": int(iters.max()),
            "relative_residual": float(res.max()),
            "tol": self.tol,
            "converged": converged,
            "negative_curvature": bool(negative.any()),
        }
        if not converged:
            warnings.warn(
                f"CG did not converge for member {member.name!r}: relative residual {float(res.max()):.2e} after "
                f"{int(iters.max())} iterations (tol={self.tol}, negative curvature: {bool(negative.any())}); "
                "raise max_iter or damping",
                RuntimeWarning,
                stacklevel=3,
            )
        return query_dtype(x, vectors)


class LiSSA(InverseHessian):
    """LiSSA: the Neumann series ``(H + lambda I)^{-1} v = (1/s) sum_t (I - (H + lambda I)/s)^t v``.

    Iterates ``x <- v + x - (H + lambda I) x / s`` (``x_0 = v``) and returns ``x / s``.
    With ``batch_size=None`` each step uses the full-data Hessian
    (deterministic); with a ``batch_size`` each step uses the Hessian of a
    random minibatch (seeded, the classic stochastic estimator) and the result
    is averaged over ``repeats`` runs. It converges when ``H + lambda I`` is
    positive definite and ``s`` exceeds half its largest eigenvalue; the error
    shrinks like ``(1 - lambda_min / s)^t``.

    Full-data runs stop when the update — which equals the residual of the
    current estimate — is below ``tol * ||v||``. ``report[member]`` holds
    ``iterations``, ``relative_residual`` (max over rows, recomputed on the full
    data), ``scale`` and ``converged``.

    Args:
        damping: ``lambda >= 0`` (default 0).
        iterations: maximum number of steps (recursion depth).
        scale: ``s``; ``None`` sets it to 1.1 x the largest eigenvalue of
            ``H + lambda I`` found by 20 steps of power iteration.
        tol: relative-residual tolerance (full-data runs only).
        batch_size: training examples per stochastic step; ``None`` = all.
        repeats: independent stochastic runs averaged.
        seed: seed of the minibatch draws.
    """

    name = "lissa"

    def __init__(
        self,
        damping: float | None = None,
        iterations: int = 1000,
        scale: float | None = None,
        tol: float = 1e-5,
        batch_size: int | None = None,
        repeats: int = 1,
        seed: int = 0,
    ):
        super().__init__(damping)
        scale = None if scale is None else number(scale, "scale", 0, above=True)
        if batch_size is not None:
            batch_size = integer(batch_size, "batch_size", note=" or None")
        self.iterations, self.scale = integer(iterations, "iterations"), scale
        self.tol = number(tol, "tol", 0, above=True)
        self.batch_size, self.repeats = batch_size, integer(repeats, "repeats")
        self.seed = integer(seed, "seed", minimum=None)

    def options(self):
        return {
            **super().options(),
            "iterations": self.iterations,
            "scale": self.scale,
            "tol": self.tol,
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "seed": self.seed,
        }

    def _scale(self, obj, member) -> float:
        if self.scale is not None:
            return float(self.scale)
        key = ("scale", member.name)
        if key not in self._state:
            self._state[key] = 1.1 * (obj.power_top_eigenvalue(seed=self.seed) + self.lam)
        return self._state[key]

    def solve(self, member, vectors):
        obj = self.objective(member)
        lam, s = self.lam, self._scale(obj, member)
        b = vectors.to(obj.device, torch.float64)
        n = member.n_train
        stochastic = self.batch_size is not None and self.batch_size < n
        gen = torch.Generator().manual_seed(self.seed)
        total = torch.zeros_like(b)
        steps, met = 0, False
        for _ in range(self.repeats if stochastic else 1):
            x = b.clone()
            for t in range(self.iterations):
                idx = torch.randint(0, n, (self.batch_size,), generator=gen) if stochastic else None
                update = b - (obj.hvp(x, idx) + lam * x) / s
                x = x + update
                steps = max(steps, t + 1)
                if not np.isfinite(float(x.abs().max())):
                    raise FloatingPointError(
                        f"LiSSA diverged for member {member.name!r} (scale={s:.4g}): raise scale or damping"
                    )
                if not stochastic and bool((update.norm(dim=1) <= self.tol * b.norm(dim=1)).all()):
                    met = True
                    break
            total += x
        x = total / (self.repeats if stochastic else 1) / s
        res = _relative_residuals(obj, lam, x, b)
        converged = met if not stochastic else bool((res <= self.tol).all())
        self.report[member.name] = {
            "method": self.name,
            "dim": obj.dim,
            "damping": lam,
            "rows": int(b.shape[0]),
            "scale": s,
            "iterations": steps,
            "relative_residual": float(res.max()),
            "tol": self.tol,
            "converged": converged,
        }
        if not converged:
            worst = float(res.max())
            if stochastic:
                fix = "raise repeats or batch_size, or pass batch_size=None (the full-data series)"
            elif worst > 1:
                fix = "raise scale (the series is far from its limit)"
            else:
                fix = "raise iterations or damping"
            warnings.warn(
                f"LiSSA did not converge for member {member.name!r}: relative residual {worst:.2e} after "
                f"{steps} iterations (scale={s:.4g}{', stochastic' if stochastic else ''}); {fix}",
                RuntimeWarning,
                stacklevel=3,
            )
        return query_dtype(x, vectors)
