"""Classification: cross-entropy over logits, or a binary logit with 0/1 labels."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Batch, map_batch, slice_batch
from ..errors import HessfreeError, LabelError
from ._outputs import _example_outputs, _fmt, _inspectable, _rows, _tensor_outputs
from .base import Task


def _is_binary_logit(outputs: torch.Tensor) -> bool:
    return outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1)


def _class_labels(labels: Any, task: Task) -> torch.Tensor:
    """Labels as ``(N,)`` (``(N, 1)`` flattened); a named error for any other shape."""
    if not isinstance(labels, torch.Tensor):
        raise LabelError(
            f"labels must be a tensor of class indices, got {type(labels).__name__}; "
            "class names can be encoded with hf.data.encode_labels"
        )
    if labels.dim() == 2 and labels.shape[1] == 1:
        return labels.reshape(-1)
    if labels.dim() != 1:
        raise LabelError(
            f"labels have shape {tuple(labels.shape)}; {type(task).__name__} needs one class index per example, "
            "shape (N,) or (N, 1) (one-hot or probability labels: pass labels.argmax(1); soft targets: hf.Task "
            "with your own loss_fn)"
        )
    if labels.is_complex():
        raise LabelError(f"labels have dtype {labels.dtype}; pass integer class indices")
    return labels


def _check_class_values(labels: torch.Tensor, n_out: int, offset: int | None) -> None:
    """Every label an integer in [0, n_out) ({0, 1} for one output); raise naming
    the first offender (``offset=None``: index within the batch)."""
    hi = 2 if n_out == 1 else n_out
    y = labels
    bad = (y < 0) | (y >= hi)
    if y.is_floating_point():
        bad = bad | ~torch.isfinite(y) | (y != torch.round(y))
    if not bool(bad.any()):
        return
    i = int(torch.nonzero(bad)[0])
    v = y[i].item()
    if isinstance(v, float) and not v.is_integer():  # also NaN and infinity
        def message(where: str) -> str:
            return (f"{where} has label {_fmt(v) if math.isfinite(v) else v}; class labels must be integers "
                    f"0 to {hi - 1} (a fractional label would be truncated to a class). Soft targets need hf.Task "
                    "with your own loss_fn")  # fmt: skip
    elif n_out == 1:
        def message(where: str) -> str:
            return (f"{where} has label {_fmt(v)}, but the model has one output (a binary logit): labels must be "
                    "0 or 1; for more classes give the model one output per class")  # fmt: skip
    else:
        def message(where: str) -> str:
            return (f"{where} has label {_fmt(v)}, but the model has {n_out} outputs (labels 0 to {n_out - 1}); "
                    "fix the label or give the model one output per class")  # fmt: skip
    raise LabelError.in_batch(i, message) if offset is None else LabelError(message(f"example {offset + i}"))


class ClassificationTask(Task):
    """Cross-entropy per example.

    Outputs of shape ``(B, C)`` with ``C >= 2`` use softmax cross-entropy with
    integer labels ``0..C-1``; outputs of shape ``(B,)`` or ``(B, 1)`` are one
    logit of the positive class and use binary cross-entropy with 0/1 labels.
    Labels have shape ``(B,)`` or ``(B, 1)``; integer-valued floats are
    accepted. Loss unit: nats.

    Raises:
        hessfree.errors.LabelError: from :meth:`check_data`, :meth:`check_batch`
            and :meth:`loss`, naming the example and its label, for a label
            outside the model's classes, a fractional or non-finite label, or
            labels of another shape.
        hessfree.HessfreeError: when the model's output is not a tensor of
            logits (a tuple, say).
    """

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, loss_fn=None, **kwargs)
        self._n_out: int | None = None

    def labels(self, batch: Batch) -> Any:
        """Labels of ``batch``, ``(B,)`` (labels of shape ``(B, 1)`` are flattened)."""
        labels = super().labels(batch)
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == 1:
            return labels.reshape(-1)
        return labels

    def _outputs(self, outputs: Any, n: int) -> torch.Tensor:
        outputs = _rows(_tensor_outputs(outputs, self), n)
        if outputs.dim() not in (1, 2) or outputs.shape[0] != n:
            raise HessfreeError(
                f"the model returned outputs of shape {tuple(outputs.shape)} for {n} labels; "
                "ClassificationTask needs logits (B, C) or (B,) with one row per example (per-token "
                "labels need hf.Task with your own loss_fn)"
            )
        return outputs

    def n_outputs(self, example: Batch) -> int:
        """Number of model outputs per example (1 for a binary logit), from a
        forward pass on ``example`` (a batch of one, in eval mode)."""
        out = self._outputs(_example_outputs(self, example), 1)
        return 1 if _is_binary_logit(out) else int(out.shape[1])

    def check_data(self, source) -> None:
        """Check the labels of ``source`` once, before any gradient.

        The number of classes comes from the model's outputs on the first
        example. Labels must have shape ``(N,)`` or ``(N, 1)`` and be integers
        in ``[0, C)`` (``0`` or ``1`` for a model with one output). Tensor data
        and a loader over a ``TensorDataset`` are checked at once, whole; for
        any other loader the first batch is checked here (reading every item
        twice would double the loading, and a resumed store would reload
        finished batches) and every later batch before its gradients, by
        :meth:`check_batch` and the loss.

        Raises:
            hessfree.errors.LabelError: naming the first bad example and its label.
        """
        first = next(iter(source))
        self._n_out = self.n_outputs(slice_batch(first, 0, 1))
        labels = self._labels_to_check(source, first)
        _check_class_values(_class_labels(labels, self), self._n_out, 0)

    def check_batch(self, batch: Batch) -> None:
        """Check the labels of ``batch`` (see :meth:`check_data`); the error
        names the example's index in the batch."""
        labels = _class_labels(self.labels(batch), self)
        if getattr(self, "_n_out", None) is None:
            self._n_out = self.n_outputs(map_batch(batch, lambda t: t[:1]))
        _check_class_values(labels, self._n_out, None)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = _class_labels(self.labels(batch), self)
        outputs = self._outputs(outputs, labels.shape[0])
        binary = _is_binary_logit(outputs)
        if _inspectable(labels):  # inside vmap, check_batch has done this
            _check_class_values(labels, 1 if binary else int(outputs.shape[1]), None)
        if binary:
            logit = outputs.reshape(-1)
            return F.binary_cross_entropy_with_logits(logit, labels.to(logit.dtype), reduction="none")
        return F.cross_entropy(outputs, labels.long(), reduction="none")

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        outputs = _tensor_outputs(outputs, self)
        if _is_binary_logit(outputs):
            p = torch.sigmoid(outputs.reshape(-1))
            return torch.stack([1 - p, p], dim=1)
        return torch.softmax(outputs, dim=-1)
