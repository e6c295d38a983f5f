"""Self-influence measured at the model's outputs.

The parameter-space self-influence of example ``i`` at member ``m`` is
``||grad_theta l_i||^2 = r_i^T J_i J_i^T r_i`` with ``r_i = d l_i / d f(x_i)``
the gradient of the loss with respect to the outputs (logits) and ``J_i`` the
Jacobian of the outputs with respect to the parameters. Replacing the kernel
``J_i J_i^T`` by the identity gives the output-space self-influence
``||r_i||^2``: the same Hessian-free idea one step further, with no
per-example parameter gradients at all (one forward pass per member).

For softmax cross-entropy ``r_i = softmax(f(x_i)) - onehot(y_i)``, so
``||r_i||^2`` is in [0, 2]: it does not grow without bound with the loss, and
it does not carry the size of the example's features (``||J_i||``), which for
the output layer is the factor ``||h_i||^2 + 1`` that varies with the input
and not with whether the label is right. On the noisy-label study
(docs/applications.md) this form, summed over checkpoints, ranks flipped
labels better than the parameter-space one in every setting.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._progress import progress_bar
from .data import DataSource, batch_size_of, to_device
from .members import as_members, member_views, model_device
from .task import Task


def _member_passes(task: Task, data: Any, members: Any, batch_size: int, device, progress, desc: str):
    """``(n, n_members, passes)``: ``passes`` yields ``(member index, member weight,
    functional model, offset, batch on the device)`` for every member and batch,
    members in eval mode, with a progress bar over both."""
    source = DataSource(data, batch_size=batch_size, name="data")
    device = model_device(task.model) if device is None else torch.device(device)
    specs = as_members(members).specs()
    example = to_device(source.first_example(), device)

    def passes():
        bar = progress_bar(len(specs) * source.n, desc, progress)
        for m, view in member_views(specs, task.model, task, example, device):
            fn = view.functional()
            for start, batch in source.batches():
                yield m, view.weight, fn, start, to_device(batch, device)
                bar.update(batch_size_of(batch))
        bar.close()

    return source.n, len(specs), passes()


def output_self_influence(
    task: Task,
    data: Any,
    members: Any = None,
    *,
    reduce: str | None = "sum",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Output-space self-influence ``w_m ||d l_i / d f(x_i; theta_m)||^2`` of every example.

    Args:
        task: the task (its ``forward`` must return one tensor of outputs per
            example, e.g. logits ``(B, K)``; its ``loss`` is differentiated
            with respect to them, sample weights included).
        data: the examples (anything :class:`hessfree.data.DataSource` accepts).
        members: ``None`` (the model as it is) or :mod:`hessfree.members`;
            each member is evaluated in eval mode, with its masks or noise.
        reduce: ``"sum"`` (weighted sum over members, TracIn-CP), ``"mean"``
            (divided by the number of members) or ``None`` (one row per member).
        batch_size: examples per forward pass.
        device: where to compute (default: the model's device).
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        ``(n,)`` (or ``(M, n)`` with ``reduce=None``) in loss units squared per
        output unit squared (nats² per logit² for classification) times the
        member weight (the learning rate for checkpoints). Larger = the
        example's own loss is more sensitive to the outputs (it is fitted
        less well); with checkpoints, summed over training.
    """
    if reduce not in (None, "sum", "mean"):
        raise ValueError(f"reduce must be None, 'sum' or 'mean', got {reduce!r}")
    n, n_members, passes = _member_passes(task, data, members, batch_size, device, progress, "output self-influence")
    rows = np.zeros((n_members, n))
    for m, weight, fn, start, batch in passes:
        with torch.no_grad():
            out = task.forward(fn, batch)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"output_self_influence needs the task's forward to return a tensor, got "
                f"{type(out).__name__}; override Task.forward to return the outputs the loss uses"
            )
        out = out.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = task.loss(out, batch)
            w = task.weights(batch)
            if w is not None:
                losses = losses * w.to(losses.dtype)
            (r,) = torch.autograd.grad(losses.sum(), out)
        b = out.shape[0]
        s = r.detach().double().reshape(b, -1).pow(2).sum(1)
        if not torch.isfinite(s).all():
            bad = start + int(torch.nonzero(~torch.isfinite(s))[0])
            raise FloatingPointError(f"the output gradient of example {bad} is not finite; check its inputs and label")
        rows[m, start : start + b] = s.cpu().numpy() * weight
    if reduce is None:
        return rows
    total = rows.sum(0)
    return total / n_members if reduce == "mean" else total


def member_probabilities(
    task: Task,
    data: Any,
    members: Any = None,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Class probabilities of every example, averaged over the members.

    Each member (in eval mode, with its masks or noise) gives
    ``task.probabilities(outputs)``; the result is their plain mean (every
    member counts once, whatever its weight). With
    ``Checkpoints(result.checkpoints, ...)`` this is the prediction of the
    whole training run rather than of its end: a flipped label that the final
    model has started to fit is still outvoted by the earlier checkpoints.

    Returns:
        ``(n, C)`` probabilities in [0, 1]; each row sums to 1.
    """
    n, n_members, passes = _member_passes(task, data, members, batch_size, device, progress, "member probabilities")
    total: np.ndarray | None = None
    for _, _, fn, start, batch in passes:
        with torch.no_grad():
            p = task.probabilities(task.forward(fn, batch)).double().cpu().numpy()
        if total is None:
            total = np.zeros((n, p.shape[1]))
        total[start : start + p.shape[0]] += p
    if total is None:
        raise ValueError("member_probabilities: the data is empty")
    return total / n_members


__all__ = ["member_probabilities", "output_self_influence"]
