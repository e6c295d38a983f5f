"""Per-example gradients with torch.func (``vmap(grad(loss of one example))``) and
by a plain loop (one backward pass per example, the reference).

Each example is run as a batch of one, so models written for batched inputs
work unchanged. The model must not mix examples within a batch:
hessfree evaluates every member in eval mode (BatchNorm uses its running
statistics, dropout layers are off) and restores the mode afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch.func import grad, vmap

from ..data import Batch, batch_size_of, map_batch, slice_batch

if TYPE_CHECKING:
    from ..members import MemberView


def check_vmappable(batch: Batch) -> None:
    leaves = batch.items() if isinstance(batch, Mapping) else enumerate(batch)
    for key, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"batch entry {key!r} is a {type(leaf).__name__}; per-example gradients need "
                "every batch entry to be a tensor with one row per example"
            )


def example_loss_fn(view: MemberView, names: list[str]):
    """``f(selected_params, example) -> scalar`` weighted loss of a single example."""
    task = view.task

    def loss_one(selected: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in example.items()} if isinstance(example, Mapping) else tuple(
            v.unsqueeze(0) for v in example
        )
        return task.per_example_loss(view.functional(selected), one).sum()

    return loss_one


def per_example_grads(view: MemberView, names: list[str], batch: Batch) -> dict[str, torch.Tensor]:
    """Gradients of each example's (sample-weighted) loss.

    Returns:
        ``{name: (B, *param.shape)}`` for the selected parameter names,
        in loss units per parameter unit.
    """
    check_vmappable(batch)
    view.task.check_batch(batch)
    selected = {n: view.params[n] for n in names}
    return vmap(grad(example_loss_fn(view, names)), in_dims=(None, 0))(selected, batch)


def per_example_grads_loop(view: MemberView, names: list[str], batch: Batch) -> dict[str, torch.Tensor]:
    """Per-example gradients by one backward pass per example (the slow reference:
    each example is run alone as a batch of one, so it works on every model).

    Returns:
        ``{name: (B, *param.shape)}`` in loss units per parameter unit.
    """
    view.task.check_batch(batch)
    b = batch_size_of(batch)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.enable_grad():
        for i in range(b):
            selected = {n: view.params[n].detach().requires_grad_(True) for n in names}
            loss = view.task.per_example_loss(view.functional(selected), slice_batch(batch, i, i + 1)).sum()
            grads = torch.autograd.grad(loss, [selected[n] for n in names], allow_unused=True) if loss.requires_grad else [None] * len(names)
            for n, g in zip(names, grads):
                rows[n].append(torch.zeros_like(selected[n]) if g is None else g.detach())
    return {n: torch.stack(r) for n, r in rows.items()}


def flat_per_example_grads(view: MemberView, names: list[str], batch: Batch) -> torch.Tensor:
    """Per-example gradients flattened and concatenated in ``names`` order, ``(B, D)``."""
    grads = per_example_grads(view, names, batch)
    b = next(iter(grads.values())).shape[0]
    return torch.cat([grads[n].reshape(b, -1) for n in names], dim=1)


def flatten(grads: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """One gradient (not per example) flattened in ``names`` order, ``(D,)``."""
    return torch.cat([grads[n].reshape(-1) for n in names])


def probe_of(batch: Batch, size: int = 2) -> Batch:
    """The first ``size`` examples of ``batch`` (cloned, so no larger tensor is kept):
    two examples suffice to catch a rule that mixes examples up."""
    n = min(size, batch_size_of(batch))
    return map_batch(slice_batch(batch, 0, n), lambda t: t.clone())
