"""Targets: the differentiable quantity f(theta) that influence is measured against.

Lower f is better for every target (lower validation loss, smaller fairness
gap, lower loss under attack), so a positive influence score means a training
step on the example lowers f: the example helps.

A target is evaluated over its held-out data in batches. Each target returns
additive per-batch statistics (``sums``) and a function ``combine`` of their
totals; its exact gradient is then taken in two passes (totals first, then the
chain rule batch by batch), so held-out sets of any size fit in memory and
non-linear targets such as absolute group gaps stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ._checks import integer
from ._modes import eval_mode
from .attacks import Attack
from .data import Batch, DataSource, batch_size_of, map_batch, slice_batch, to_device
from .members import single_view
from .task import Task


class Target:
    """Base class. Subclasses define ``sums`` and ``combine``.

    Args:
        data: held-out data in any form :class:`hessfree.data.DataSource` accepts.
        batch_size: examples per batch when evaluating the target.
    """

    name = "target"

    def __init__(self, data: Any, batch_size: int = 1024):
        try:
            self.source = DataSource(data, batch_size=batch_size, name=f"{type(self).__name__} data")
        except ValueError as e:
            if "empty" in str(e):
                raise ValueError(f"{type(self).__name__}: the target set is empty; pass at least one example") from e
            raise

    # ---- what subclasses define --------------------------------------------
    def sums(self, task: Task, model: Callable, batch: Batch, offset: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def combine(self, totals: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, task: Task) -> None:
        """Check the target against the task before any gradient is taken."""

    def not_finite(self) -> str:
        """Why a gradient of f may not be finite: the first example of the target's data
        with a NaN or infinite value, named; else a hint about the loss."""
        source = getattr(self, "source", None)
        for offset, batch in source.batches() if source is not None else ():
            tensors = batch.values() if isinstance(batch, dict) else batch
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
                    return f"target example {offset + int(torch.nonzero(bad)[0])} has a NaN or infinite value"
        return "check the target's data and the loss (log of 0, division by 0)"

    def batches(self, view) -> list[tuple[int, Batch]]:
        """The (offset, batch) pairs f is computed on at this member (moved to its device)."""
        device = next(iter(view.params.values())).device
        return [(o, map_batch(b, lambda t: t.to(device))) for o, b in self.source.batches()]

    # ---- value and gradient --------------------------------------------------
    def value(self, view) -> float:
        """f at the member's parameters (target units)."""
        model = view.functional()
        with torch.no_grad():
            return float(self.combine(self._totals(view.task, model, self.batches(view))))

    def _totals(self, task, model, batches) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = {}
        for offset, batch in batches:
            for k, v in self.sums(task, model, batch, offset).items():
                totals[k] = totals[k] + v if k in totals else v
        return totals

    def _check_differentiable(self, value: Any) -> None:
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            raise ValueError(f"the {self.name} target's value has no gradient with respect to the model's parameters: "
                             "it must be computed from the model's outputs with torch operations (no .detach(), "
                             ".item(), numpy or torch.no_grad())")  # fmt: skip

    def gradient(self, view, names: list[str]) -> dict[str, torch.Tensor]:
        """Exact gradient of f w.r.t. the selected parameters at the member."""
        selected = {n: view.params[n].detach().requires_grad_(True) for n in names}
        leaves = list(selected.values())
        task, model = view.task, view.functional(selected)
        batches = self.batches(view)
        with torch.enable_grad():
            if len(batches) == 1:
                offset, batch = batches[0]
                f = self.combine(self.sums(task, model, batch, offset))
                self._check_differentiable(f)
                grads = torch.autograd.grad(f, leaves, allow_unused=True)
            else:
                with torch.no_grad():
                    totals = self._totals(task, view.functional(), batches)
                totals = {k: v.detach().requires_grad_(True) for k, v in totals.items()}
                f = self.combine(totals)
                keys = list(totals)
                dfds = torch.autograd.grad(f, [totals[k] for k in keys], allow_unused=True)
                weights = {k: (g if g is not None else torch.zeros_like(totals[k])) for k, g in zip(keys, dfds)}
                acc = [torch.zeros_like(p) for p in leaves]
                for offset, batch in batches:
                    s = self.sums(task, model, batch, offset)
                    surrogate = sum((weights[k] * s[k]).sum() for k in keys)
                    self._check_differentiable(surrogate)
                    part = torch.autograd.grad(surrogate, leaves, allow_unused=True)
                    acc = [a + g if g is not None else a for a, g in zip(acc, part)]
                grads = acc
        return {n: (g.detach() if g is not None else torch.zeros_like(p)) for (n, p), g in zip(selected.items(), grads)}

    def evaluate(self, task: Task, model: torch.nn.Module | None = None) -> float:
        """f of a plain model (default ``task.model``), in eval mode; target units."""
        model = task.model if model is None else model
        with single_view(task, model, self.source.first_example()) as view:
            self.validate(task)
            return self.value(view)


class Utility(Target):
    """Mean loss on held-out data (weighted mean when the data carries sample
    weights). Units: loss units (nats for classification)."""

    name = "utility"

    def validate(self, task: Task) -> None:
        """Sample weights of the held-out data, when given: >= 0 and not all 0 (checked
        whole for tensor data, else on the first batch)."""
        every = self.source.tensors_without_loading()
        w = task.weights(every if every is not None else next(iter(self.source)))
        if w is None:
            return
        w = torch.as_tensor(w).double().reshape(-1)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            i = int(torch.nonzero(~torch.isfinite(w) | (w < 0))[0])
            raise ValueError(f"Utility: held-out example {i} has sample weight {float(w[i]):g}; weights must be "
                             "finite and >= 0 (the target is their weighted mean loss)")  # fmt: skip
        if every is not None and not bool((w > 0).any()):
            raise ValueError("Utility: every held-out sample weight is 0, so the weighted mean loss is undefined")

    def sums(self, task, model, batch, offset):
        losses = task.per_example_loss(model, batch, weighted=False)
        w = task.weights(batch)
        if w is None:
            return {"loss": losses.sum(), "n": torch.tensor(float(losses.shape[0]), device=losses.device)}
        w = w.to(losses.dtype)
        return {"loss": (losses * w).sum(), "n": w.sum()}

    def combine(self, totals):
        return totals["loss"] / totals["n"]


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
            example = slice_batch(next(iter(self.source)), 0, 1)
            device = next((p.device for p in task.model.parameters()), None)
            with torch.no_grad(), eval_mode(task.model):
                out = task.forward(task.model, example if device is None else to_device(example, device))
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


class Robustness(Target):
    """Mean loss on adversarially perturbed held-out data; lower is more robust.

    By default (``hold_fixed=True``) the adversarial inputs are found by
    ``attack`` at each member's parameters and then held fixed. For attacks that
    maximise the loss (PGD, FGSM) that is the gradient of the worst-case loss
    (Danskin's theorem). ``LinearMinimal`` does not maximise the loss: its point
    moves with the weights, so the held-fixed gradient misses how a training
    step moves the attack; ``hold_fixed=False`` differentiates through the
    closed-form attack instead (the target then tracks retraining with a fresh
    attack). Units: loss units.

    Args:
        data: held-out data.
        attack: an :mod:`hessfree.attacks` attack.
        input_key: for dict batches, the key of the input to perturb.
        hold_fixed: hold the adversarial inputs fixed (default) or, for
            ``LinearMinimal``, differentiate through the attack.
    """

    name = "robustness"

    def __init__(
        self,
        data: Any,
        attack: Attack,
        input_key: str | None = None,
        batch_size: int = 1024,
        hold_fixed: bool = True,
    ):
        super().__init__(data, batch_size=batch_size)
        if not isinstance(attack, Attack):
            raise TypeError(f"Robustness: attack must be an hf.attacks attack, got {type(attack).__name__}")
        if not hold_fixed and not hasattr(attack, "perturb_differentiable"):
            raise ValueError(
                f"Robustness(hold_fixed=False) needs an attack with a differentiable closed form "
                f"(hf.attacks.LinearMinimal), got {attack!r}; for loss-maximising attacks the "
                "held-fixed gradient is already the worst-case gradient (Danskin)"
            )
        self.attack, self.input_key, self.hold_fixed = attack, input_key, hold_fixed

    def _replace_input(self, batch: Batch, x: torch.Tensor) -> Batch:
        if isinstance(batch, Mapping):
            return {**batch, self._key(batch): x}
        return (x,) + tuple(batch[1:])

    def _key(self, batch: Mapping) -> str:
        if self.input_key is not None:
            return self.input_key
        floats = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if len(floats) != 1:
            raise ValueError(f"Robustness: set input_key= to one of {list(batch)} (the input to perturb)")
        return floats[0]

    def _input(self, batch: Batch) -> torch.Tensor:
        x = batch[self._key(batch)] if isinstance(batch, Mapping) else batch[0]
        if not x.is_floating_point():
            raise TypeError("Robustness: the attacked input must be a floating-point tensor")
        return x

    def batches(self, view):
        if not self.hold_fixed:  # the attack runs inside sums(), differentiably
            return super().batches(view)
        task, model = view.task, view.functional()
        out = []
        for offset, batch in super().batches(view):
            x = self._input(batch)
            x_adv = self.attack.perturb(
                x,
                lambda z, batch=batch: task.per_example_loss(model, self._replace_input(batch, z)),
                lambda z, batch=batch: task.forward(model, self._replace_input(batch, z)),
            )
            out.append((offset, self._replace_input(batch, x_adv)))
        return out

    def adversarial(self, task: Task, model: torch.nn.Module | None = None) -> Batch:
        """The adversarial held-out data for a plain model (default ``task.model``), attacked
        in eval mode as the scores are (each submodule's mode is restored afterwards)."""
        model = task.model if model is None else model
        with single_view(task, model, self.source.first_example()) as view:
            if self.hold_fixed:
                parts = [b for _, b in self.batches(view)]
            else:
                fmodel = view.functional()
                parts = [map_batch(self._attacked(task, fmodel, b), torch.Tensor.detach) for _, b in self.batches(view)]
        if isinstance(parts[0], Mapping):
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))

    def _attacked(self, task: Task, model: Callable, batch: Batch) -> Batch:
        """``batch`` with its input replaced by the attack, as a differentiable
        function of the parameters behind ``model``."""
        x_adv = self.attack.perturb_differentiable(
            self._input(batch), lambda z: task.forward(model, self._replace_input(batch, z))
        )
        return self._replace_input(batch, x_adv)

    def sums(self, task, model, batch, offset):
        if not self.hold_fixed:
            batch = self._attacked(task, model, batch)
        return Utility.sums(self, task, model, batch, offset)

    combine = Utility.combine


class Custom(Target):
    """Any differentiable scalar: ``fn(model, batch) -> scalar``, summed over batches.

    ``model`` is a callable standing in for the member's model. With tensor data
    and the default ``batch_size=None`` the whole data is one batch, so ``fn``
    may be non-additive; with several batches ``fn`` must be a sum over
    examples. Lower must be better for the sign convention to hold.
    """

    name = "custom"

    def __init__(self, fn: Callable[[Callable, Batch], torch.Tensor], data: Any, batch_size: int | None = None):
        if not callable(fn):
            raise TypeError(f"Custom: fn must be callable (model, batch) -> scalar, got {type(fn).__name__}")
        probe = DataSource(data, name="Custom data") if data is not None else None
        if probe is None:
            raise ValueError("Custom: data is required (pass the held-out data fn is computed on)")
        super().__init__(data, batch_size=batch_size or probe.n)
        self.fn = fn

    def sums(self, task, model, batch, offset):
        value = self.fn(model, batch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("Custom: fn must return a scalar tensor")
        return {"value": value.reshape(())}

    def combine(self, totals):
        return totals["value"]
