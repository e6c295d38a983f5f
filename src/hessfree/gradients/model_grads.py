"""Per-example gradients of a plain model, for inspection and tests."""

from __future__ import annotations

import torch

from ..data import Batch, slice_batch
from ..members import single_view
from ..params import select_parameters
from .functional import probe_of
from .projected import ProjectedFeatures


def per_example_gradients(task, batch: Batch, params=None, engine: str = "auto") -> dict[str, torch.Tensor]:
    """Per-example gradients of ``task.model`` at its current parameters.

    A convenience for inspection and tests: the model is evaluated in eval mode
    (restored afterwards), ``params`` selects parameters as in
    :class:`hessfree.Influence` and ``engine`` is one of :data:`ENGINES`.

    Returns:
        ``{name: (B, *param.shape)}``, in loss units per parameter unit.
    """
    with single_view(task, task.model, slice_batch(batch, 0, 1)) as view:
        names = select_parameters(task.model, params, view.call_order)
        return ProjectedFeatures(None, view, names, engine, probe_of(batch)).per_example_grads(view, batch)
