"""Train / curate / retrain with one recipe, so before and after are comparable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import curation
from ._common import check_fraction

ACTIONS = ("remove", "relabel", "reweight")
STRATEGIES = ("influence", "random")


def fit_model(make_model: Callable[[], nn.Module], x, y, seed: int, train_kwargs: dict | None, **curate) -> nn.Module:
    """``curation.retrain`` with the recipe of ``train_kwargs`` (progress off by default)."""
    kw = {"progress": False, **(train_kwargs or {})}
    return curation.retrain(make_model, x, y, seed=seed, **curate, **kw)


def curate(
    scores: np.ndarray | None,
    y: torch.Tensor,
    action: str,
    fraction: float,
    strategy: str,
    seed: int,
    n_classes: int,
    new_labels: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """What to pass to the retrain (``remove=`` / ``labels=`` / ``weights=``)
    and the indices acted on.

    ``strategy="influence"`` acts on the most NEGATIVE scores (most harmful);
    ``"random"`` on a seeded uniform draw of the same size (a baseline).
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    fraction = check_fraction(fraction)
    n = y.shape[0]
    k = int(round(fraction * n))
    if strategy == "random":
        rng = np.random.default_rng(10_007 + seed)
        scores = rng.standard_normal(n)
    idx = curation.most_harmful(scores, count=k)
    y_np = y.cpu().numpy().reshape(-1)
    if action == "remove":
        return {"remove": idx}, idx
    if action == "relabel":
        if new_labels is None:
            if n_classes != 2:
                raise ValueError("action='relabel' on more than two classes needs new_labels (for example predictions)")
            new_labels = 1 - y_np
        labels = y_np.copy()
        labels[idx] = np.asarray(new_labels)[idx]
        return {"labels": torch.as_tensor(labels, dtype=y.dtype)}, idx
    # reweight: the worst k get weight 0, the rest w = clip(1 + 0.5 z, 0, 2) (z: z-scored influence).
    # The seed paper's softmax rule (curation.reweight(method="softmax")) cost 5-19 points of clean
    # accuracy on COMPAS in our studies, so the applications use the linear rule.
    weights = curation.reweight(scores, method="linear") if strategy == "influence" else np.ones(n)
    weights[idx] = 0.0
    return {"weights": weights}, idx
