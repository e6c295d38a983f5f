"""How well does a random projection preserve influence scores, on the user's own model and data?

A projection ``P`` (``D x k``) gives unbiased scores, ``E[(P^T g) . (P^T h)] = g . h``,
but each projected inner product carries noise of order ``||g|| ||h|| / sqrt(k)``
(Johnson-Lindenstrauss; Achlioptas 2003). Whether that noise matters depends on
how large the inner products are next to the norms, i.e. on how orthogonal the
per-example gradients of this model are: at k = 1024 the Spearman correlation
with the exact scores is 0.88 for Factorized on an MLP on MNIST but 0.79 on the
LoRA weights of a small Llama (``docs/scale.md``).

:func:`projection_quality` measures it on a small seeded sample: exact pairwise
scores ``g_j . g_i`` (the estimator without projection) against projected ones
at the user's ``k`` and at ``k/4`` and ``k/16``; Pearson and Spearman correlation
over the pairs, the relative error, and the top-10 overlap per query. The noise
variance falls like ``k^-b`` (``b = 1`` for a dense Gaussian or Rademacher
matrix, about ``1/2`` for Kronecker-factored ones on rank-one layer gradients),
so ``1/r^2 - 1`` (``r`` the correlation, Spearman by default) is fitted as a power of ``k``
over the measured ``k`` and extrapolated to the ``k`` that reaches
``target_correlation``. A poor correlation raises
:class:`ProjectionQualityWarning` with the numbers and that ``k``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import integer
from .._io import atomic_write_json
from ..influence import Influence
from ..metrics import pearson, spearman
from ..projections import Dense, Factorized, Projection
from ..task import Task
from ._sample import sample_indices, size_of, take

RESULT_FILE = "projection_quality.json"


class ProjectionQualityWarning(UserWarning):
    """Projected scores correlate poorly with the exact ones on the measured sample."""


@dataclass
class ProjectionQuality:
    """What :func:`projection_quality` measured.

    Attributes:
        projection: the measured projection (``Projection.describe()``; a list for seed ensembles).
        n_train: training examples in the sample; ``n_query``: query examples
            (the training sample itself when no queries were given: then the
            ``n (n - 1)`` off-diagonal pairs are compared).
        exact_dim: ``D``, the length of an exact per-example gradient (member 0).
        k: the realised projection dimension of member 0.
        pearson, spearman: correlation of projected with exact pairwise scores at ``k``, in [-1, 1].
        relative_error: ``||S_proj - S_exact||_F / ||S_exact||_F`` over the compared pairs.
        top10_overlap: mean share of each query's 10 highest exact scores found
            among its 10 highest projected scores, in [0, 1].
        by_dim: one dict per measured ``k`` (``k_requested``, ``k``, ``pearson``,
            ``spearman``, ``relative_error``, ``top10_overlap``, ``seconds``).
        exponent: ``b`` in ``1/r^2 - 1 ~ k^-b`` (fitted when two or more ``k`` were
            informative; otherwise the theoretical value, see ``exponent_fitted``).
        target_correlation: the correlation asked for; ``metric``: which one
            (``"spearman"``, the default: rankings are what top-k and LDS use, and
            a few large-norm examples can hold the Pearson correlation high while
            the ranking of the rest is noise; or ``"pearson"``).
        k_for_target: the ``k`` predicted to reach it (a power of two, rounded
            up, below ``D``); ``None`` when that power of two is ``D`` or more:
            use the exact gradients (``projection=None``), no more costly and exact.
        seconds_exact: time of the exact pairwise scores.
        note: how the sample was capped, if it was.
        exact_scores, projected_scores: the compared ``(n_query, n_train)`` matrices at ``k``.
    """

    projection: Any
    n_train: int
    n_query: int
    exact_dim: int
    k: int
    pearson: float
    spearman: float
    relative_error: float
    top10_overlap: float
    by_dim: list[dict]
    exponent: float
    exponent_fitted: bool
    target_correlation: float
    metric: str
    k_for_target: int | None
    seconds_exact: float
    note: str = ""
    exact_scores: np.ndarray = field(default=None, repr=False)
    projected_scores: np.ndarray = field(default=None, repr=False)

    @property
    def correlation(self) -> float:
        """The correlation the target applies to (``metric``: Spearman by default)."""
        return self.spearman if self.metric == "spearman" else self.pearson

    @property
    def adequate(self) -> bool:
        """Whether the correlation at ``k`` reaches ``target_correlation``."""
        return self.correlation >= self.target_correlation

    def advice(self) -> str:
        """One sentence: is this ``k`` enough, and which ``k`` would be."""
        other = "Pearson" if self.metric == "spearman" else "Spearman"
        head = (f"projected scores at k={self.k} correlate {self.correlation:.3f} ({self.metric.capitalize()}; {other} "
                f"{self.pearson if other == 'Pearson' else self.spearman:.3f}) with the exact ones on "
                f"{self.n_train} training examples")
        if self.adequate:
            return head + f": above the target {self.target_correlation}"
        fix = (f"k={self.k_for_target} is predicted to reach {self.target_correlation}"
               if self.k_for_target is not None else
               f"the k predicted to reach {self.target_correlation} is D={self.exact_dim} (the exact gradients) or "
               "close to it; use projection=None")
        return head + f": below the target {self.target_correlation}; {fix} (or average several projection seeds)"

    def to_dict(self) -> dict:
        """JSON-friendly content (without the score matrices)."""
        out = asdict(self)
        out.pop("exact_scores")
        out.pop("projected_scores")
        return out

    def __str__(self) -> str:
        lines = [f"Projection quality of {self.projection} (D = {self.exact_dim}, exact in {self.seconds_exact:.2f} s)",
                 "k | Pearson | Spearman | rel. error | top-10 overlap | seconds"]
        for r in self.by_dim:
            lines.append(f"{r['k']} | {r['pearson']:.3f} | {r['spearman']:.3f} | {r['relative_error']:.3f} | "
                         f"{r['top10_overlap']:.2f} | {r['seconds']:.2f}")
        fitted = "fitted" if self.exponent_fitted else "assumed"
        lines.append(f"noise ~ k^-{self.exponent:.2f} ({fitted}); {self.advice()}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def _at_dim(p: Projection, k: int) -> Projection | None:
    """The same kind of projection (same seed) at dimension ``k``; ``None`` for an unknown kind."""
    if isinstance(p, Dense):
        return Dense(k, kind=p.kind, seed=p.seed, block_rows=p.block_rows, cache_bytes=p.cache_bytes)
    if isinstance(p, Factorized):
        return Factorized(k, seed=p.seed, kind=p.kind)
    return None


def _projection_list(projection: Any) -> list[Projection]:
    items = list(projection) if isinstance(projection, (list, tuple)) else [projection]
    if not items or any(not isinstance(p, Projection) for p in items):
        raise TypeError(f"projection={projection!r}: give an hf.projections.Dense(k) or Factorized(k) (or a list of them)")
    if any(p.dim is None for p in items):
        raise ValueError("projection=Factorized(None) keeps exact gradients: there is nothing to measure")
    return items


def _compare(exact: np.ndarray, approx: np.ndarray, off_diagonal: bool) -> dict[str, float]:
    mask = np.ones(exact.shape, dtype=bool)
    if off_diagonal:
        np.fill_diagonal(mask, False)
    e, a = exact[mask], approx[mask]
    top = min(10, mask.shape[1] - int(off_diagonal))
    overlaps = []
    for j in range(exact.shape[0]):
        cols = np.flatnonzero(mask[j])
        best_e = set(cols[np.argsort(-exact[j, cols], kind="stable")[:top]])
        best_a = set(cols[np.argsort(-approx[j, cols], kind="stable")[:top]])
        overlaps.append(len(best_e & best_a) / top)
    return {"pearson": pearson(a, e), "spearman": spearman(a, e),
            "relative_error": float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300)),
            "top10_overlap": float(np.mean(overlaps))}  # fmt: skip


def fit_exponent(ks: list[int], correlations: list[float], default: float) -> tuple[float, bool]:
    """``b`` in ``1/r^2 - 1 = c k^-b`` by least squares on logs over the informative
    points (``0 < r < 1``), clipped to ``[0.25, 2]``; ``(default, False)`` with fewer than two."""
    pts = [(math.log(k), math.log(1 / r**2 - 1)) for k, r in zip(ks, correlations) if 0 < r < 1 - 1e-9]
    if len({x for x, _ in pts}) < 2:
        return default, False
    x, y = np.array(pts).T
    slope = float(np.polyfit(x, y, 1)[0])
    return float(np.clip(-slope, 0.25, 2.0)), True


def k_for_correlation(k: int, r: float, target: float, exponent: float) -> float:
    """The ``k`` at which ``1/r^2 - 1`` has fallen (like ``k^-exponent``) to ``1/target^2 - 1``."""
    if r >= target:
        ratio = 1.0 if r >= 1 else (1 / r**2 - 1) / (1 / target**2 - 1)
    else:
        ratio = (1 / max(r, 1e-6) ** 2 - 1) / (1 / target**2 - 1)
    return k * ratio ** (1 / exponent)


def projection_quality(
    task: Task | Influence,
    data: Any,
    projection: Projection | list[Projection] | None = None,
    *,
    queries: Any = None,
    members: Any = None,
    params: Any = None,
    n_sample: int = 200,
    dims: list[int] | None = None,
    target_correlation: float = 0.9,
    metric: str = "spearman",
    max_bytes: int = 512 * 2**20,
    seed: int = 0,
    engine: str = "auto",
    batch_size: int = 64,
    warn: bool = True,
    save_to: str | Path | None = None,
) -> ProjectionQuality:
    """Correlation of projected with exact pairwise scores on a sample of ``data``.

    Args:
        task: the :class:`hessfree.Task`, or a configured :class:`hessfree.Influence`
            (its task, members, params, engine and projection are used; it need not be fitted).
        data: training data (anything ``Influence.fit`` accepts); ``n_sample`` examples are drawn (seeded).
        projection: the projection to measure (default: the estimator's).
        queries: test data whose scores matter (``n_sample`` drawn); default: the
            training sample against itself, without the diagonal (self-influence).
        members, params: as for ``hf.Influence``.
        dims: the ``k`` to measure besides the projection's own (default ``k/4`` and
            ``k/16``, those >= 8), used to fit how the noise falls with ``k``.
        target_correlation: the correlation wanted (default 0.9), ``metric``
            ``"spearman"`` (default) or ``"pearson"``.
        max_bytes: memory for the exact per-example gradients (default 512 MiB):
            the sample is cut so that ``(n_members n_train + n_query) D`` numbers fit;
            ``note`` says when it was.
        warn: emit :class:`ProjectionQualityWarning` when the correlation is below the target.
        save_to: a folder (e.g. the estimator's ``store``; created if missing): writes
            ``projection_quality.json`` there.

    Returns:
        :class:`ProjectionQuality`; scores keep the library's units and sign.

    Raises:
        ValueError: a bad ``n_sample`` / ``target_correlation``, or ``max_bytes``
            too small for 10 exact gradients (the message gives ``D`` and the bytes needed).
    """
    if isinstance(task, Influence):
        est = task
        task, members, params = est.task, est.members if members is None else members, est.params if params is None else params
        engine, projection = est.engine, est.projection if projection is None else projection
    if projection is None:
        raise ValueError("projection_quality needs a projection: pass projection=hf.projections.Dense(k) or Factorized(k)")
    projs = _projection_list(projection)
    n_sample = integer(n_sample, "n_sample", 3)
    if save_to is not None and Path(save_to).exists() and not Path(save_to).is_dir():
        raise ValueError(f"save_to={str(save_to)!r} is a file; give a folder ({RESULT_FILE} is written in it)")
    if not 0 < target_correlation < 1:
        raise ValueError(f"target_correlation must be in (0, 1), got {target_correlation}")
    if metric not in ("spearman", "pearson"):
        raise ValueError(f"metric must be 'spearman' or 'pearson', got {metric!r}")

    def estimator(proj, cache_bytes):
        return Influence(task, members, params, projection=proj, engine=engine, batch_size=batch_size,
                         max_cache_bytes=cache_bytes, progress=False)  # fmt: skip

    n_data = size_of(data, "data")
    probe = estimator(None, 0).fit(take(data, np.arange(min(2, n_data)), batch_size, "data"))
    D, n_members = max(probe.feature_dim), len(probe.member_names)
    itemsize = 8 if next(task.model.parameters()).dtype == torch.float64 else 4
    per_example = (n_members + 1) * D * itemsize  # cached training features + one member's queries
    cap = int(max_bytes // per_example)
    if cap < 10:
        raise ValueError(f"max_bytes={max_bytes} holds exact gradients (D={D} numbers, {n_members} member(s)) for only "
                         f"{cap} examples; give max_bytes >= {10 * per_example} or select fewer parameters (params=)")
    n = min(n_sample, n_data, cap)
    note = (f"sample cut to {n} examples so that the exact gradients fit max_bytes={max_bytes}"
            if n < min(n_sample, n_data) else "")
    train_s = take(data, sample_indices(n_data, n, seed), batch_size, "data")
    n_query = n if queries is None else min(n, size_of(queries, "queries"))
    query_s = train_s if queries is None else take(queries, sample_indices(size_of(queries, "queries"), n, seed + 1),
                                                      batch_size, "queries")

    start = time.perf_counter()
    exact = estimator(None, int(max_bytes)).fit(train_s).pairwise(query_s)
    seconds_exact = time.perf_counter() - start

    k_user = projs[0].dim
    wanted = [k_user] + [k for k in (dims if dims is not None else [k_user // 4, k_user // 16]) if 8 <= k and k != k_user]
    same_kind = all(type(p) is type(projs[0]) and p.dim == k_user for p in projs)
    rows, user = [], None
    for k in dict.fromkeys(wanted):
        at_k = projs if k == k_user else ([_at_dim(p, k) for p in projs] if same_kind else [None])
        if any(p is None for p in at_k):
            continue
        start = time.perf_counter()
        est_k = estimator(at_k if len(at_k) > 1 else at_k[0], int(max_bytes))
        approx = est_k.fit(train_s).pairwise(query_s)
        row = {"k_requested": k, "k": int(est_k.feature_dim[0]), **_compare(exact, approx, queries is None),
               "seconds": time.perf_counter() - start}
        rows.append(row)
        if k == k_user:
            user = (row, approx)
    default_b = 1.0 if isinstance(projs[0], Dense) else 0.5
    b, fitted = fit_exponent([r["k"] for r in rows], [r[metric] for r in rows], default_b)
    urow = user[0]
    k_star = k_for_correlation(urow["k"], urow[metric], target_correlation, b)
    k_power = 2 ** math.ceil(math.log2(max(k_star, 1)))
    k_target = None if k_power >= D else k_power  # at k >= D the exact gradients cost no more and are exact
    result = ProjectionQuality(
        projection=[p.describe() for p in projs] if len(projs) > 1 else projs[0].describe(),
        n_train=n, n_query=n_query, exact_dim=D, k=urow["k"], pearson=urow["pearson"], spearman=urow["spearman"],
        relative_error=urow["relative_error"], top10_overlap=urow["top10_overlap"], by_dim=rows, exponent=b,
        exponent_fitted=fitted, target_correlation=target_correlation, metric=metric, k_for_target=k_target,
        seconds_exact=seconds_exact, note=note, exact_scores=exact, projected_scores=user[1],
    )
    if save_to is not None:
        Path(save_to).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(save_to) / RESULT_FILE, result.to_dict())
    if warn and not result.adequate:
        warnings.warn(result.advice(), ProjectionQualityWarning, stacklevel=2)
    return result
