"""The damped empirical Fisher of the (projected) training features, inverted once per member."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.linalg
import torch
from scipy.linalg.blas import dsyrk
from scipy.linalg.lapack import dpotrf

from .._checks import integer
from ..distributed import all_reduce_sum
from .base import MemberInputs, QueryTransform

DEFAULT_RATIO = 0.1
DEFAULT_MAX_DIM = 20000


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_damping_ratio(value: Any) -> float:
    """``value`` as a float when it is a finite number > 0 (not a bool); otherwise ``ValueError`` naming it."""
    if not (_is_real(value) and np.isfinite(value) and value > 0):
        raise ValueError(f"damping_ratio must be a finite number > 0, got {value!r}")
    return float(value)


class EmpiricalFisher(QueryTransform):
    """Curvature-corrected scores from the stored features: ``hessian="fisher"``.

    Per member ``m``, with ``Phi_m`` the ``(n, k)`` matrix of its training
    features (per-example gradients, projected when ``projection=`` is set), the
    damped empirical Fisher (Gauss-Newton approximation of the Hessian of the
    mean training loss) is

        F_m = Phi_m^T Phi_m / n + lambda_m I        (k x k, float64)

    With sample weights ``w_i`` (the training objective ``(1/n) sum_i w_i l_i``)
    the features are ``phi_i = w_i g_i`` and the Fisher is that of the weighted
    objective, ``(1/n) sum_i w_i g_i g_i^T`` (rows ``phi_i / sqrt(w_i)``, see
    :meth:`MemberInputs.fisher_blocks`): rescaling every weight by ``c`` leaves the
    scores unchanged, as it leaves the exact influence unchanged.

    Scores become

        score_i = sum_m w_m * phi_i^T F_m^{-1} q_m,

    with ``q_m`` the query's features (the projected target gradient, or a test
    example's projected gradient); ``self_influence`` gives
    ``sum_m w_m phi_i^T F_m^{-1} phi_i``. Sign and units are those of the
    other comparators (see :mod:`hessfree.hessian.base`): positive = the
    example helps (lowers f), and ``score_i / n`` predicts the rise of ``f``
    when example ``i`` is removed and the model retrained, with the Hessian
    replaced by the empirical Fisher.

    ``Phi^T Phi`` is accumulated block by block over the training features (from
    memory or streamed from the disk store; ``Phi`` is never formed), summed over
    torch.distributed ranks, Cholesky-factorised once at the end of ``fit`` (again
    after every ``fit``, also when a store is reopened) and reused by every later query. Memory ``16 k^2``
    bytes, time ``n k^2 + k^3 / 3`` flops.

    This is the curvature of TRAK (Park et al., 2023, "TRAK: Attributing Model
    Behavior at Scale") and LoGra (Choe et al., 2024) on projected gradients:
    ``hf.Influence(task, members=hf.members.Models([...]),
    projection=hf.projections.Dense(k), hessian="fisher")`` (independently
    trained models, each with its own Fisher, scores summed or averaged over
    models) is the TRAK recipe; ``Factorized(k)`` is LoGra's projection.

    Args:
        damping: ``lambda >= 0`` for every member; ``None`` (default) uses the rule
            ``lambda_m = damping_ratio * trace(Phi_m^T Phi_m / n) / k`` (a fraction of
            the mean eigenvalue of the undamped Fisher).
        damping_ratio: the fraction used by the default rule (``None``: 0.1, the heuristic of
            Kronfluence's damping; docs/fidelity.md part (d) measures others). Not with ``damping``.
        max_dim: refuse feature sizes ``k`` above this (a ``ValueError`` before any
            gradient is computed suggests ``projection=Factorized(k)``).
        eig_max_dim: up to this ``k`` the report gives the exact eigenvalue range
            and condition number (LAPACK ``eigh``, ``O(k^3)``, several times a
            Cholesky); above it Lanczos estimates from the Cholesky factor
            (``O(k^2)`` per step), computed when the report is first read: the
            largest eigenvalue and the bound ``(max + lambda) / lambda`` on the
            condition number (``condition_number_bound``; the smallest
            eigenvalue of ``Phi^T Phi / n`` is >= 0, and not computed).

    ``report[member]`` (``est.hessian_report_``) holds ``dim`` (k), ``n``,
    ``damping``, ``damping_rule``, ``min_eigenvalue`` / ``max_eigenvalue`` of
    ``Phi^T Phi / n`` (undamped), ``condition_number`` of the damped ``F``,
    ``eigenvalues`` (how they were found: exactly, or estimated above
    ``eig_max_dim``) and ``seconds`` (``gram``, ``cholesky``, ``report``).

    Raises:
        ValueError: ``k > max_dim``; a damped Fisher that is not positive definite
            (``damping=0`` with fewer training examples than ``k``); features all zero;
            a negative sample weight; a store of weighted data reopened without the data.
    """

    name = "fisher"
    space = "features"

    def __init__(
        self,
        damping: float | None = None,
        damping_ratio: float | None = None,
        max_dim: int = DEFAULT_MAX_DIM,
        eig_max_dim: int = 512,
    ):
        super().__init__()
        if damping is not None and not (_is_real(damping) and np.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0 (or None for the default rule), got {damping!r}")
        if damping_ratio is not None:
            check_damping_ratio(damping_ratio)
        if damping is not None and damping_ratio is not None:
            raise ValueError(f"give damping={damping!r} or damping_ratio={damping_ratio!r}, not both: the ratio only "
                             "sets the default rule")
        damping_ratio = DEFAULT_RATIO if damping_ratio is None else damping_ratio
        self.damping, self.damping_ratio = damping, float(damping_ratio)
        self.max_dim, self.eig_max_dim = integer(max_dim, "max_dim"), integer(eig_max_dim, "eig_max_dim", minimum=0)

    @property
    def report(self) -> dict[str, dict[str, Any]]:
        for name, (chol, lam) in list(self._pending.items()):  # k > eig_max_dim: estimated on first read
            t = time.perf_counter()
            hi = _largest_eigenvalue(chol)
            rep = self._report[name]
            rep.update(min_eigenvalue=None, max_eigenvalue=hi - lam, condition_number=None,
                       condition_number_bound=hi / lam if lam > 0 else float("inf"),
                       eigenvalues="largest by Lanczos (eigsh, tol 1e-6); smallest >= 0 (not computed)")  # fmt: skip
            rep["seconds"]["report"] += time.perf_counter() - t
            del self._pending[name]
        return self._report

    @report.setter
    def report(self, value: dict[str, dict[str, Any]]) -> None:
        self._report, self._pending = value, {}

    def options(self) -> dict[str, Any]:
        return {"method": self.name, "damping": self.damping,
                "damping_ratio": None if self.damping is not None else self.damping_ratio, "max_dim": self.max_dim}

    def check_dims(self, dims: list[int]) -> None:
        big = [k for k in dims if k > self.max_dim]
        if big:
            k = big[0]
            raise ValueError(
                f"hessian='fisher' needs a k x k matrix per member and the features have k={k} "
                f"({16 * k * k / 1e9:.1f} GB for the matrix and its factor), above max_dim={self.max_dim}; "
                "project the gradients first, e.g. projection=hf.projections.Factorized(4096), "
                "or select fewer parameters (params='last')"
            )

    def gram(self, member: MemberInputs) -> torch.Tensor:
        """``Phi^T Phi`` over every rank's training features, ``(k, k)`` float64.

        Products in float64 (the same sum whatever the block size, so memory and
        store agree); on the CPU by BLAS ``dsyrk`` (one triangle: half the flops of
        a matrix product, about the cost of a float32 one).
        """
        gram, rows, device = None, 0, None
        for _, f in member.fisher_blocks():
            device, rows = f.device, rows + f.shape[0]
            if f.device.type == "cpu":
                a = np.asarray(f.detach().double().numpy(), order="C")  # (b, k): its transpose is Fortran-ordered
                if gram is None:
                    gram = np.zeros((member.dim, member.dim), order="F")
                gram = dsyrk(1.0, a.T, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
            else:
                f = f.double()
                gram = f.T @ f if gram is None else gram.addmm_(f.T, f)
        if gram is None:
            gram = np.zeros((member.dim, member.dim))
        elif isinstance(gram, np.ndarray):  # the upper triangle was accumulated (the strict lower one is 0)
            upper = torch.from_numpy(gram)
            full = upper + upper.T
            full.diagonal().sub_(upper.diagonal())
            gram = (full if full.is_contiguous() else full.T).numpy()  # symmetric: either order is the matrix
        else:
            gram = gram.cpu().numpy()
        rows = int(round(float(all_reduce_sum(np.array([float(rows)]))[0])))
        if rows != member.n_train:
            raise RuntimeError(f"member {member.name!r}: the training features have {rows} rows, "
                               f"expected {member.n_train}")  # fmt: skip
        return torch.from_numpy(np.ascontiguousarray(all_reduce_sum(gram))).to(device or "cpu")

    def factor(self, member: MemberInputs) -> tuple[torch.Tensor, float]:
        """The Cholesky factor ``L`` of ``F = Phi^T Phi / n + lambda I`` (lower, float64) and ``lambda``."""
        if member.name in self._state:
            return self._state[member.name]
        k, n = member.dim, member.n_train
        t0 = time.perf_counter()
        fisher = self.gram(member) / n
        t1 = time.perf_counter()
        mean_eig = float(torch.diagonal(fisher).sum()) / k
        if self.damping is None:
            if not mean_eig > 0:
                raise ValueError(f"member {member.name!r}: every training feature is zero, so the default damping "
                                 "(a fraction of the mean eigenvalue) is 0; pass damping > 0")  # fmt: skip
            lam, rule = self.damping_ratio * mean_eig, f"{self.damping_ratio:g} x mean eigenvalue"
        else:
            lam, rule = float(self.damping), "given"
        if fisher.device.type == "cpu":  # LAPACK's dpotrf: about twice torch's speed on the CPU
            damped = fisher.numpy().copy()
            damped[np.diag_indices(k)] += lam
            # damped.T is the same symmetric matrix in Fortran order; its upper factor U (F = U^T U), read back
            # in C order, is the lower factor L = U^T: no copy either way
            up, info = dpotrf(damped.T, lower=0, clean=1, overwrite_a=1)
            chol = torch.from_numpy(up.T)
        else:
            chol, info = torch.linalg.cholesky_ex(fisher + lam * torch.eye(k, dtype=fisher.dtype, device=fisher.device))
        if int(info) != 0:
            raise ValueError(
                f"member {member.name!r}: the damped Fisher Phi^T Phi / n + {lam:g} I (k={k}, n={n}) is not positive "
                "definite; pass a larger damping (or damping=None for the default rule, a fraction of the mean "
                "eigenvalue)"
            )
        t2 = time.perf_counter()
        report = {"method": self.name, "dim": k, "n": n, "damping": lam, "damping_rule": rule,
                  "mean_eigenvalue": mean_eig}  # fmt: skip
        if k <= max(self.eig_max_dim, 2):  # Lanczos needs k >= 3
            evals = scipy.linalg.eigh(fisher.cpu().numpy(), eigvals_only=True)  # LAPACK; torch's is slow on CPU
            lo, hi = float(evals[0]), float(evals[-1])
            report.update(min_eigenvalue=lo, max_eigenvalue=hi, condition_number=(hi + lam) / max(lo + lam, 1e-300),
                          eigenvalues="eigh")  # fmt: skip
        else:
            self._pending[member.name] = (chol, lam)  # estimated when the report is first read
        report["seconds"] = {"gram": t1 - t0, "cholesky": t2 - t1, "report": time.perf_counter() - t2}
        self._report[member.name] = report
        self._state[member.name] = (chol, lam)
        return chol, lam

    def prepare(self, member: MemberInputs) -> None:
        self.factor(member)

    def transform(self, member: MemberInputs, vectors: torch.Tensor) -> torch.Tensor:
        """``F^{-1} v`` for each row of ``vectors`` ``(Q, k)``; the input's dtype (float32 or float64)."""
        chol, _ = self.factor(member)
        v = vectors.to(device=chol.device, dtype=torch.float64)
        out = torch.cholesky_solve(v.T, chol).T
        return out.to(device=vectors.device, dtype=vectors.dtype if vectors.dtype == torch.float64 else torch.float32)


def _largest_eigenvalue(chol: torch.Tensor) -> float:
    """Largest eigenvalue of ``F = L L^T`` by Lanczos (scipy ``eigsh``, relative
    tolerance 1e-6) from the Cholesky factor alone, ``O(k^2)`` per step."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    low = chol.cpu().numpy()
    k = low.shape[0]
    fwd = LinearOperator((k, k), matvec=lambda v: low @ (low.T @ v.reshape(-1)), dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(k)
    return float(eigsh(fwd, k=1, which="LA", tol=1e-6, v0=start, return_eigenvectors=False)[0])
