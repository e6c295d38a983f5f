"""Reading model outputs: logits of ModelOutputs, batch dimensions after a squeeze, eval mode."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._modes import eval_mode
from ..data import Batch, map_batch
from ..errors import HessfreeError


def _logits_of(out: Any) -> Any:
    """The logits of a ``ModelOutput`` / dict output; anything else as it is."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    return out


def _rows(out: Any, n: int) -> Any:
    """Give a batch of one its batch dimension back after a ``.squeeze()``."""
    if isinstance(out, torch.Tensor) and n == 1:
        if out.dim() == 0:
            return out.reshape(1)
        if out.dim() == 1 and out.shape[0] != 1:
            return out.reshape(1, -1)
    return out


def _tensor_outputs(out: Any, task: Any) -> torch.Tensor:
    out = _logits_of(out)
    if isinstance(out, torch.Tensor):
        return out
    what = f"a tuple of {len(out)}" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
    raise HessfreeError(
        f"{type(task).__name__} needs the model to return its outputs as one tensor (or an object with "
        f".logits, or a dict with 'logits'); it returned {what}. Override Task.forward to return the tensor "
        "the loss uses, or use hf.Task with your own loss_fn"
    )


def _inspectable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values may be read (not inside vmap / grad transforms or
    compilation, where a data-dependent branch is not allowed)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and wrapped(t):
        return False
    return not torch.compiler.is_compiling()


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{float(v):.6g}"


def _example_outputs(task: Any, example: Batch) -> torch.Tensor:
    """``task.model``'s outputs for a batch of one (no gradient, eval mode, on the model's device)."""
    model = task.model
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        example = map_batch(example, lambda t: t.to(device))
    with torch.no_grad(), eval_mode(model):
        return _tensor_outputs(task.forward(model, example), task)
