"""Any differentiable scalar as a target (see :mod:`hessfree.targets`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..data import Batch, DataSource
from .base import Target


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
