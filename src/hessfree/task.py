"""What the user tells hessfree: a model, a per-example loss and the batch format.

A :class:`Task` splits every batch into model inputs, labels and optional sample
weights, runs the model and returns one loss per example. Everything else in the
library (gradients, members, targets) only calls :meth:`Task.forward`,
:meth:`Task.loss` and :meth:`Task.weights`, so a subclass that overrides those
three (for example a causal language model that masks prompt tokens) plugs in
everywhere.

Batch formats:

* tuples ``(x, y)`` or ``(x, y, w)``: the model is called as ``model(x)``;
* dicts: the keys ``label_key`` (default ``"labels"``) and ``weight_key``
  (default ``"weight"``) are taken out and the rest is passed as keyword
  arguments, ``model(**rest)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Task:
    """A model with a per-example loss.

    Args:
        model: the ``nn.Module`` being explained.
        loss_fn: ``loss_fn(outputs, labels) -> (B,)`` losses, one per example
            (``reduction="none"``).
        label_key: key of the labels in dict batches.
        weight_key: key of the sample weights in dict batches (optional).

    The per-example training loss is ``w_i * loss_fn(...)_i`` when the batch
    carries sample weights ``w`` and ``loss_fn(...)_i`` otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        label_key: str = "labels",
        weight_key: str = "weight",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is None and type(self).loss is Task.loss:
            raise ValueError(
                "Task needs loss_fn(outputs, labels) -> per-example losses; or use "
                "hf.ClassificationTask / hf.RegressionTask"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.label_key = label_key
        self.weight_key = weight_key

    # ---- batch format -------------------------------------------------------
    def inputs(self, batch: Batch) -> tuple[tuple, dict]:
        """Positional and keyword model inputs of ``batch``."""
        if isinstance(batch, Mapping):
            skip = {self.label_key, self.weight_key}
            return (), {k: v for k, v in batch.items() if k not in skip}
        return (batch[0],), {}

    def labels(self, batch: Batch) -> Any:
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                raise KeyError(
                    f"dict batch has no {self.label_key!r} key (keys: {sorted(batch)}); "
                    "set label_key=... on the task"
                )
            return batch[self.label_key]
        if len(batch) < 2:
            raise ValueError("tuple batches must be (x, y) or (x, y, sample_weight)")
        return batch[1]

    def weights(self, batch: Batch) -> torch.Tensor | None:
        """Sample weights of ``batch``, shape ``(B,)``, or ``None``."""
        if isinstance(batch, Mapping):
            return batch.get(self.weight_key)
        return batch[2] if len(batch) > 2 else None

    def check_data(self, source) -> None:
        """Validate a whole data source (labels, shapes) once, before any gradient
        is taken; raise naming the example index and value. No-op by default."""

    def check_batch(self, batch: Batch) -> None:
        """Validate a whole batch before per-example gradients are taken
        (data-dependent checks cannot run inside ``vmap``). No-op by default."""

    # ---- model and loss -----------------------------------------------------
    def forward(self, model: Callable, batch: Batch) -> Any:
        """Run ``model`` (a module or a functional stand-in) on ``batch``."""
        args, kwargs = self.inputs(batch)
        return model(*args, **kwargs)

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """Unweighted per-example losses, shape ``(B,)``."""
        return self.loss_fn(outputs, self.labels(batch))

    def per_example_loss(self, model: Callable, batch: Batch, weighted: bool = True) -> torch.Tensor:
        """Per-example (optionally sample-weighted) losses, shape ``(B,)``."""
        losses = self.loss(self.forward(model, batch), batch)
        if losses.dim() != 1:
            raise ValueError(
                f"the loss must return one value per example (reduction='none'), got shape "
                f"{tuple(losses.shape)}"
            )
        w = self.weights(batch) if weighted else None
        return losses * w.to(losses.dtype) if w is not None else losses

    def probabilities(self, outputs: Any) -> torch.Tensor:
        """Class probabilities ``(B, C)``; needed by the fairness targets."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define class probabilities; fairness targets "
            "need hf.ClassificationTask or a Task subclass with probabilities()"
        )


def _is_binary_logit(outputs: torch.Tensor) -> bool:
    return outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1)


class ClassificationTask(Task):
    """Cross-entropy per example.

    Outputs of shape ``(B, C)`` with ``C >= 2`` use softmax cross-entropy with
    integer labels; outputs of shape ``(B,)`` or ``(B, 1)`` are one logit of the
    positive class and use binary cross-entropy with 0/1 labels. Loss unit: nats.
    """

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, loss_fn=None, **kwargs)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = self.labels(batch)
        if _is_binary_logit(outputs):
            logit = outputs.reshape(-1)
            return F.binary_cross_entropy_with_logits(logit, labels.to(logit.dtype), reduction="none")
        return F.cross_entropy(outputs, labels.long(), reduction="none")

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        if _is_binary_logit(outputs):
            p = torch.sigmoid(outputs.reshape(-1))
            return torch.stack([1 - p, p], dim=1)
        return torch.softmax(outputs, dim=-1)


class RegressionTask(Task):
    """Squared error per example, averaged over output dimensions (units: y²)."""

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, loss_fn=None, **kwargs)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = self.labels(batch).to(outputs.dtype)
        diff = outputs.reshape(outputs.shape[0], -1) - labels.reshape(labels.shape[0], -1)
        return diff.pow(2).mean(dim=1)
