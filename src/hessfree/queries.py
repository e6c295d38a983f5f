"""Query vectors: target gradients and test features mapped through the query transform.

The estimator calls these with explicit inputs (the transform, a builder of the
member's :class:`~hessfree.hessian.MemberInputs`, the member's projection); the
transform itself never sees the estimator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .hessian.base import MemberInputs, QueryTransform

Project = Callable[[torch.Tensor], torch.Tensor]


def transform_rows(transform: QueryTransform | None, inputs: Callable[[], MemberInputs], rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``(Q, D)`` through ``transform`` (unchanged for the identity), in their dtype and device."""
    if transform is None:
        return rows
    return transform.transform(inputs(), rows).to(device=rows.device, dtype=rows.dtype)


def query_directions(
    transform: QueryTransform | None, inputs: Callable[[], MemberInputs], project: Project | None, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A target gradient ``grad`` ``(D,)`` before and after the query transform.

    Returns ``(g, q)``: for the identity the (projected) gradient twice; for a
    parameter-space comparator ``grad`` and ``(H + damping I)^{-1} grad``
    (projections are refused with those); for a feature-space transform the
    projected gradient ``P grad`` and ``F^{-1} P grad``. Scores are inner
    products of training features with ``q``.
    """
    g = grad if grad.dtype == torch.float64 else grad.float()
    if transform is not None and transform.space == "parameters":
        q = transform_rows(transform, inputs, g[None])[0]
        return g, (q if project is None else project(q))
    g = g if project is None else project(g)
    return g, transform_rows(transform, inputs, g[None])[0]


def transformed_self_scores(
    transform: QueryTransform, inputs: Callable[[], MemberInputs], blocks: Iterable[tuple[int, torch.Tensor]]
) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset, phi_i^T T phi_i)`` per block of training features (float64 numpy)."""
    for offset, feats in blocks:
        solved = transform_rows(transform, inputs, feats)
        yield offset, (solved * feats).sum(1).double().cpu().numpy()
