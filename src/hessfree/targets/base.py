"""The :class:`Target` base class and :class:`Utility` (see :mod:`hessfree.targets`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..data import Batch, DataSource, map_batch
from ..members import single_view
from ..task import Task


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
