"""Fairness repair: remove or reweight the training examples that widen a group
gap, retrain, and trace the trade-off between the gap and accuracy.

Scores come from a :class:`hessfree.targets.DemographicParity` or
:class:`~hessfree.targets.EqualOpportunity` target on held-out data (a
differentiable surrogate of the gap: predicted probabilities). The gap that is
REPORTED is the real one, on the test set, from hard predictions:

* demographic parity: ``max_g P(yhat = fav | g) - min_g P(yhat = fav | g)``;
* equal opportunity: the same among test examples with ``y = fav`` (a
  true-positive-rate gap).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..influence import Influence
from ..targets import DemographicParity, EqualOpportunity, group_array
from ..task import ClassificationTask
from ..training import accuracy, predict
from ._common import split_xy
from ._retrain import curate, fit_model

GAPS = {"dp": DemographicParity, "eo": EqualOpportunity}


def group_gap(pred: Any, y: Any, groups: Any, metric: str = "dp", favourable: int = 1) -> float:
    """The hard-prediction gap (see the module docstring), in [0, 1]."""
    pred, y, g = (np.asarray(a).reshape(-1) for a in (pred, y, groups))
    if metric not in GAPS:
        raise ValueError(f"metric must be 'dp' or 'eo', got {metric!r}")
    if not (len(pred) == len(y) == len(g)):
        raise ValueError(f"pred ({len(pred)}), y ({len(y)}) and groups ({len(g)}) need one entry per example")
    if pred.dtype.kind == "f" and not np.all(pred == np.round(pred)):
        raise ValueError("pred must be hard class predictions (e.g. hf.training.predict), not probabilities")
    if favourable not in set(np.unique(y).tolist()) | set(np.unique(pred).tolist()):
        raise ValueError(f"favourable={favourable!r} is neither a label nor a prediction here (labels "
                         f"{np.unique(y).tolist()}); pass the favourable class")  # fmt: skip
    if len(np.unique(g)) < 2:
        raise ValueError(f"a group gap needs at least two groups; groups has only {np.unique(g).tolist()}")
    rates = []
    for level in np.unique(g):
        sel = g == level
        if metric == "eo":
            sel = sel & (y == favourable)
        if not sel.any():
            raise ValueError(f"group {level!r} has no examples{' with the favourable label' if metric == 'eo' else ''}")
        rates.append(float(np.mean(pred[sel] == favourable)))
    return max(rates) - min(rates)


@dataclass
class FairnessPoint:
    """One point of the trade-off curve (gap in [0, 1], accuracy in [0, 1])."""

    fraction: float
    gap: float
    accuracy: float


@dataclass
class FairnessResult:
    """Gap and accuracy before and after repair at each fraction.

    Attributes:
        metric: ``"dp"`` or ``"eo"``.
        action, strategy: what was done (``"random"`` is the baseline).
        gap_before, acc_before: the model trained on all the data (test set).
        curve: one :class:`FairnessPoint` per fraction.
        scores: ``(n_train,)`` influence on the gap target (positive = the
            example narrows the gap); empty for the random baseline.
        estimator: the options of the :class:`hessfree.Influence` behind the scores
            (``InfluenceArguments.to_dict()``); ``None`` for the random baseline.
    """

    metric: str
    action: str
    strategy: str
    gap_before: float
    acc_before: float
    curve: list[FairnessPoint] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    estimator: dict | None = None

    def best(self, max_acc_drop: float = 0.01) -> FairnessPoint | None:
        """The point with the smallest gap whose accuracy is within ``max_acc_drop``
        of the start (a drop of exactly ``max_acc_drop`` counts, whatever the rounding
        of float32 accuracies) and whose gap is below ``gap_before``; ``None`` if no
        point qualifies (then no share narrows the gap at that cost)."""
        slack = 1e-6  # float32 accuracies: 59/100 is not exactly 0.60 - 0.01
        ok = [p for p in self.curve if p.accuracy >= self.acc_before - max_acc_drop - slack and p.gap < self.gap_before]
        return min(ok, key=lambda p: p.gap) if ok else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = self.scores.tolist()
        return d


def repair_fairness(
    make_model: Callable[[], nn.Module],
    train: Any,
    val: Any,
    val_groups: Any,
    test: Any,
    test_groups: Any,
    *,
    metric: str = "dp",
    action: str = "remove",
    fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.1),
    favourable: int = 1,
    strategy: str = "influence",
    members: Any = None,
    params: Any = None,
    seed: int = 0,
    train_kwargs: dict | None = None,
    base_model: nn.Module | None = None,
    target_options: dict | None = None,
    **influence_kwargs: Any,
) -> FairnessResult:
    """Score, curate and retrain over a sweep of fractions.

    Args:
        make_model: builds a fresh, untrained binary classifier.
        train, val, test: ``(X, y)`` data (``y`` in {0, 1}).
        val_groups, test_groups: group id of each held-out / test example.
        metric: ``"dp"`` (demographic parity) or ``"eo"`` (equal opportunity).
        action: ``"remove"`` or ``"reweight"``.
        fractions: shares of the training data acted on (one retrain each).
        favourable: the favourable label.
        strategy: ``"influence"`` or ``"random"`` (the baseline).
        members, params, **influence_kwargs: passed to :class:`hessfree.Influence`.
        train_kwargs: passed to :func:`hessfree.training.train`.
        base_model: the model already trained on all of ``train`` with this
            recipe and seed (skips that training; for repeated runs).
        target_options: passed to the target (e.g. ``{"form": "loss_difference",
            "order": (a, b)}``; see :class:`hessfree.targets.DemographicParity`).

    Returns:
        A :class:`FairnessResult`.
    """
    if metric not in GAPS:
        raise ValueError(f"metric must be 'dp' or 'eo', got {metric!r}")
    if action not in ("remove", "reweight"):
        raise ValueError(f"repair_fairness: action must be 'remove' or 'reweight', got {action!r}")
    x, y = split_xy(train, "train")
    xv, yv = split_xy(val, "val")
    xt, yt = split_xy(test, "test")
    gv = group_array(val_groups, len(yv), "repair_fairness: val_groups")
    gt = group_array(test_groups, len(yt), "repair_fairness: test_groups")
    for name, g in (("val_groups", gv), ("test_groups", gt)):
        if len(np.unique(g)) < 2:
            raise ValueError(f"repair_fairness: {name} has one group ({np.unique(g).tolist()}); a gap needs two or more")
    classes = np.unique(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)).tolist()
    if favourable not in classes:
        raise ValueError(f"repair_fairness: favourable={favourable!r} is not a class of the training labels {classes}")
    if isinstance(fractions, (int, float)) or not len(fractions):
        raise ValueError(f"repair_fairness: fractions must be a non-empty list of shares in (0, 1), got {fractions!r}")
    for f in fractions:
        if not 0 < f < 1:
            raise ValueError(f"repair_fairness: every fraction must be in (0, 1), got {f!r}")
    model = base_model if base_model is not None else fit_model(make_model, x, y, seed, train_kwargs)
    task = ClassificationTask(model)
    scores = np.zeros(0)
    if strategy == "influence":
        target = GAPS[metric]((xv, yv), groups=gv, favourable=favourable, **(target_options or {}))
        est = Influence(task, members=members, params=params, **influence_kwargs).fit((x, y))
        scores = est.influence(target)
    result = FairnessResult(
        metric=metric,
        action=action,
        strategy=strategy,
        gap_before=group_gap(predict(model, xt), yt, gt, metric, favourable),
        acc_before=accuracy(model, xt, yt),
        scores=np.asarray(scores),
        estimator=est.arguments.to_dict() if strategy == "influence" else None,
    )
    for fraction in fractions:
        kwargs, _ = curate(scores if scores.size else None, y, action, fraction, strategy, seed, 2)
        after = fit_model(make_model, x, y, seed, train_kwargs, **kwargs)
        result.curve.append(
            FairnessPoint(
                fraction=float(fraction),
                gap=group_gap(predict(after, xt), yt, gt, metric, favourable),
                accuracy=accuracy(after, xt, yt),
            )
        )
    return result


