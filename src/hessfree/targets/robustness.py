"""The robustness target: the loss under an adversarial attack (see :mod:`hessfree.targets`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..attacks import Attack
from ..data import Batch, map_batch
from ..members import single_view
from ..task import Task
from .base import Target, Utility


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
            self._input(batch), lambda z: task.forward(model, self._replace_input(batch, z)),
            lambda z: task.per_example_loss(model, self._replace_input(batch, z)),
        )
        return self._replace_input(batch, x_adv)

    def sums(self, task, model, batch, offset):
        if not self.hold_fixed:
            batch = self._attacked(task, model, batch)
        return Utility.sums(self, task, model, batch, offset)

    combine = Utility.combine
