"""Regression: mean squared error per example."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data import Batch
from ..errors import LabelError
from ._outputs import _rows, _tensor_outputs
from .base import Task


class RegressionTask(Task):
    """Squared error per example, averaged over output dimensions (units: y²).

    Outputs ``(B,)`` or ``(B, D)`` (any trailing shape, flattened) and labels
    with the same number of values per example.

    Raises:
        hessfree.errors.LabelError: a label that is not finite (from
            :meth:`check_data` / :meth:`check_batch`, naming the example), or
            labels with another number of values per example than the outputs.
    """

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, loss_fn=None, **kwargs)

    @staticmethod
    def _check_finite(labels: Any, offset: int | None) -> None:
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
            raise LabelError(f"labels must be a tensor with one row per example, got {type(labels).__name__}")
        if not labels.is_floating_point():
            return
        bad = ~torch.isfinite(labels.reshape(labels.shape[0], -1)).all(1)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            value = labels[i].tolist()

            def message(where: str) -> str:
                return f"{where} has a label that is not finite ({value}); fix or drop the example"

            raise LabelError.in_batch(i, message) if offset is None else LabelError(message(f"example {offset + i}"))

    def check_data(self, source) -> None:
        """Check that the labels of ``source`` are finite (all of them for tensor
        data and a ``TensorDataset`` loader, else the first batch here and the
        others in :meth:`check_batch`, as for :class:`ClassificationTask`).

        Raises:
            hessfree.errors.LabelError: naming the first example with a NaN or infinite label.
        """
        self._check_finite(self._labels_to_check(source), 0)

    def check_batch(self, batch: Batch) -> None:
        self._check_finite(self.labels(batch), None)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = self.labels(batch)
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
            raise LabelError(f"labels must be a tensor with one row per example, got {type(labels).__name__}")
        n = labels.shape[0]
        outputs = _rows(_tensor_outputs(outputs, self), n)
        out = outputs.reshape(outputs.shape[0] if outputs.dim() else 1, -1)
        lab = labels.to(outputs.dtype).reshape(n, -1)
        if out.shape != lab.shape:
            raise LabelError(
                f"the labels have {lab.shape[1]} values per example ({lab.shape[0]} examples) but the model has "
                f"{out.shape[1]} output{'s' if out.shape[1] != 1 else ''} per example ({out.shape[0]} rows); "
                "they must match (a squared error between them would broadcast)"
            )
        return (out - lab).pow(2).mean(dim=1)
