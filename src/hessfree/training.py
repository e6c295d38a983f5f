"""A small, seeded SGD trainer for the models used in demos, tests and studies.

Not a training framework: it exists so that curation can be proven by
retraining, and so that TracIn-CP checkpoints come with their learning rates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._checks import integer
from ._modes import eval_mode
from ._progress import progress_bar
from .data import DataSource, map_batch
from .task import ClassificationTask, Task


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (the same object that was passed in).
        checkpoints: state dicts after each epoch (when ``checkpoints=True``).
        lrs: learning rate in effect during each epoch.
        losses: mean (sample-weighted) training loss of each epoch, in loss units.
    """

    model: nn.Module
    checkpoints: list[dict] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    data: Any,
    *,
    task: Task | None = None,
    epochs: int = 10,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    seed: int = 0,
    checkpoints: bool = False,
    progress: bool | None = None,
) -> TrainResult:
    """Train ``model`` in place with minibatch SGD (mean of per-example losses).

    Tensor data is reshuffled every epoch with a generator seeded by ``seed``;
    examples with sample weight 0 contribute nothing. Returns a
    :class:`TrainResult`.
    """
    epochs, seed = integer(epochs, "epochs"), integer(seed, "seed", minimum=None)
    task = task if task is not None else ClassificationTask(model)
    source = DataSource(data, batch_size=batch_size, name="train")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    result = TrainResult(model=model)
    model.train()
    device = next(model.parameters()).device
    bar = progress_bar(epochs, "training", progress)
    for _ in range(epochs):
        total, count = 0.0, 0.0
        for batch in source.shuffled(gen):
            batch = map_batch(batch, lambda t: t.to(device))
            losses = task.per_example_loss(model, batch)
            loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(losses.detach().sum())
            count += losses.shape[0]
        result.losses.append(total / count)
        result.lrs.append(lr)
        if checkpoints:
            result.checkpoints.append(copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()}))
        bar.update(1)
    bar.close()
    model.eval()
    return result


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Predicted class indices of a classifier in eval mode, ``(n,)``.

    ``x`` may be a tensor or a numpy array; floating-point inputs are cast to the
    model's floating dtype (as :class:`hessfree.Task` does), integer inputs are kept."""
    with eval_mode(model):
        return _predict(model, x, batch_size)


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    first = next(model.parameters())
    device = first.device
    x = torch.as_tensor(x)
    if x.is_floating_point() and first.is_floating_point():
        x = x.to(first.dtype)
    out = []
    for s in range(0, x.shape[0], batch_size):
        logits = model(x[s : s + batch_size].to(device))
        if logits.dim() == 1 or logits.shape[-1] == 1:
            out.append((logits.reshape(-1) > 0).long().cpu())
        else:
            out.append(logits.argmax(-1).cpu())
    return torch.cat(out)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correctly classified examples, in [0, 1]."""
    return float((predict(model, x) == y.reshape(-1).long().cpu()).float().mean())
