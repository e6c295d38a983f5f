"""Group fairness targets: demographic parity and equal opportunity (see :mod:`hessfree.targets`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._checks import integer
from ..data import batch_size_of, slice_batch
from ..task import Task
from .base import Target


def group_array(groups: Any, n: int, cls: str) -> np.ndarray:
    """One group id per example as a numpy array ``(n,)`` (from a list, numpy, pandas or a tensor;
    numbers or strings).

    Raises:
        ValueError: ``None``, another length, missing ids (NaN, None, pandas NA), or
            strings mixed with numbers (named, with the first positions).
    """
    if groups is None:
        raise ValueError(f"{cls}: groups= is required (one group id per held-out example)")
    arr = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"{cls}: groups has shape {arr.shape} but the data has {n} examples; pass one group id per example"
        )
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{cls}: groups has missing values (NaN) at {np.flatnonzero(np.isnan(arr))[:5].tolist()}")
    if arr.dtype.kind == "O":
        missing = [i for i, v in enumerate(arr) if _missing(v)]
        if missing:
            raise ValueError(f"{cls}: groups has missing values (None or NaN) at {missing[:5]}; fill or drop them")
        if len({isinstance(v, str) for v in arr}) > 1:
            raise ValueError(f"{cls}: groups mixes strings and numbers (e.g. {arr[0]!r} and "
                             f"{next(v for v in arr if isinstance(v, str) != isinstance(arr[0], str))!r}); "
                             "give every id one type, e.g. groups.astype(str)")  # fmt: skip
    return arr


def _missing(v: Any) -> bool:
    """``None``, a float NaN or pandas' ``NA`` / ``NaT`` (anything not equal to itself)."""
    try:
        return v is None or bool(v != v)
    except (TypeError, ValueError):  # pandas.NA refuses bool()
        return True


class _GroupGap(Target):
    """Shared machinery of the group fairness targets."""

    restrict_to_favourable = False

    def __init__(
        self,
        data: Any,
        groups: Any,
        favourable: int = 1,
        form: str = "probability",
        order: Sequence[Any] | None = None,
        batch_size: int = 1024,
    ):
        super().__init__(data, batch_size=batch_size)
        cls = type(self).__name__
        arr = group_array(groups, self.source.n, cls)
        self.levels = np.unique(arr)
        if len(self.levels) < 2:
            raise ValueError(
                f"{cls}: a fairness target needs at least two groups; groups has only {self.levels.tolist()}"
            )
        if form not in ("probability", "loss_difference"):
            raise ValueError(f"{cls}: form must be 'probability' or 'loss_difference', got {form!r}")
        self.form, self.favourable = form, integer(favourable, f"{cls}: favourable (a class index)", 0)
        if order is not None and form != "loss_difference":
            raise ValueError(f"{cls}: order= sets the sign of form='loss_difference' (group a minus group b); the "
                             f"form {form!r} is symmetric in the groups, so order={list(order)} would be ignored")  # fmt: skip
        if form == "loss_difference":
            order = list(self.levels[:2]) if order is None else list(order)
            if len(order) != 2 or any(o not in self.levels for o in order) or order[0] == order[1]:
                raise ValueError(f"{cls}: order must name two different groups of {self.levels.tolist()}, got {order}")
            self.pair = [int(np.flatnonzero(self.levels == o)[0]) for o in order]
        self.group_index = torch.from_numpy(np.searchsorted(self.levels, arr)).long()

    def validate(self, task: Task) -> None:
        if task.weights(next(iter(self.source))) is not None:
            raise ValueError(f"{type(self).__name__}: the held-out data carry sample weights, which group fairness "
                             "targets do not use (each group's examples count equally); pass the data without them")  # fmt: skip
        if self.form == "probability" or self.restrict_to_favourable:  # favourable is a class of the model
            out = task.check_runs(slice_batch(next(iter(self.source)), 0, 1), f"{type(self).__name__} data")
            classes = task.probabilities(out).shape[1]
            if self.favourable >= classes:
                raise ValueError(f"{type(self).__name__}: favourable={self.favourable}, but the model gives "
                                 f"{classes} classes (0 to {classes - 1})")  # fmt: skip
        if not self.restrict_to_favourable:
            return
        labels = task.labels(self.source.tensors()) if self.source.n else None
        y = labels.detach().cpu().numpy().reshape(-1)
        for k, level in enumerate(self.levels):
            members = self.group_index.numpy() == k
            if not np.any(y[members] == self.favourable):
                raise ValueError(
                    f"{type(self).__name__}: group {level.item()!r} has no held-out example with label "
                    f"{self.favourable}; equal opportunity needs positives in every group"
                )

    def sums(self, task, model, batch, offset):
        b = batch_size_of(batch)
        idx = self.group_index[offset : offset + b]
        outputs = task.forward(model, batch)
        if self.form == "probability":
            value = task.probabilities(outputs)[:, self.favourable]
        else:
            value = task.loss(outputs, batch)
        onehot = torch.nn.functional.one_hot(idx, len(self.levels)).to(value.dtype).to(value.device)
        if self.restrict_to_favourable:
            y = task.labels(batch).reshape(-1)
            onehot = onehot * (y == self.favourable).to(value.dtype).unsqueeze(1)
        return {"value": onehot.T @ value, "n": onehot.sum(0)}

    def combine(self, totals):
        n = totals["n"]
        if torch.any(n == 0):
            empty = self.levels[(n == 0).cpu().numpy()].tolist()  # plain Python values
            raise ValueError(f"{type(self).__name__}: groups {empty} have no examples to average over")
        means = totals["value"] / n
        if self.form == "loss_difference":
            return means[self.pair[0]] - means[self.pair[1]]
        i, j = torch.triu_indices(len(means), len(means), offset=1)
        return (means[i] - means[j]).abs().mean()


class DemographicParity(_GroupGap):
    """Demographic-parity gap surrogate; lower is fairer.

    ``form="probability"`` (default): with ``P_g`` the mean predicted probability
    of the favourable class in group g,
    ``f = mean over pairs a < b of |P_a - P_b|`` (for two groups ``|P_a - P_b|``).
    Units: probability.

    ``form="loss_difference"`` (the seed paper's signed form):
    ``f = L_a - L_b``, the mean loss of group ``order[0]`` minus that of
    ``order[1]`` (default: the two smallest group ids). Lowering it moves loss
    from group a to group b, so put the disadvantaged group first. Units: nats.
    """

    name = "demographic_parity"


class EqualOpportunity(_GroupGap):
    """Equal-opportunity gap surrogate: the demographic-parity formulas restricted
    to held-out examples whose true label is ``favourable`` (a true-positive-rate
    gap). Every group needs at least one such example. Lower is fairer."""

    name = "equal_opportunity"
    restrict_to_favourable = True
