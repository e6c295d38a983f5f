"""The :class:`Task` base class: batch splitting, the forward pass and per-example losses (see
:mod:`hessfree.task` for the batch formats and what the model may return)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._modes import eval_mode
from ..data import Batch, batch_size_of, to_device
from ..errors import DataError, HessfreeError
from ._outputs import _logits_of, _rows

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

    Model inputs are cast to the model's floating-point dtype (the dtype of its
    first floating-point parameter): float64 numpy arrays into a float32
    model, float32 data into a float64 or bfloat16 model. Only floating-point
    inputs are cast; integer inputs (token ids, attention masks) and the labels
    and weights keep their dtype. ``loss_fn`` receives the model's logits when
    the model returns a ``ModelOutput`` or a dict with ``"logits"`` (override
    :meth:`forward` to receive something else).
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
        self._dtype_param: torch.Tensor | None = None

    # ---- batch format -------------------------------------------------------
    @property
    def model_dtype(self) -> torch.dtype | None:
        """The floating-point dtype model inputs are cast to: that of the model's
        first floating-point parameter (or buffer); ``None`` if it has none.

        The parameter is looked up once and its dtype read on every call, so a
        later ``model.double()`` / ``model.to(torch.bfloat16)`` is followed."""
        if getattr(self, "_dtype_param", None) is None:
            tensors = [*self.model.parameters(), *self.model.buffers()]
            self._dtype_param = next((t for t in tensors if t.is_floating_point()), None)
            if self._dtype_param is None:
                return None
        return self._dtype_param.dtype

    def _cast_input(self, value: Any) -> Any:
        dtype = self.model_dtype
        if isinstance(value, torch.Tensor) and value.is_floating_point() and dtype is not None and value.dtype != dtype:
            return value.to(dtype)
        return value

    def inputs(self, batch: Batch) -> tuple[tuple, dict]:
        """Positional and keyword model inputs of ``batch``, floating-point
        tensors cast to :attr:`model_dtype` (integer tensors as they are)."""
        if isinstance(batch, Mapping):
            skip = {self.label_key, self.weight_key}
            return (), {k: self._cast_input(v) for k, v in batch.items() if k not in skip}
        return (self._cast_input(batch[0]),), {}

    def _check_keywords(self, kwargs: Mapping[str, Any]) -> None:
        """Refuse dict keys the model's ``forward`` has no parameter for (a dataset's ``idx``
        column would otherwise end in a bare ``TypeError`` inside the model)."""
        if getattr(self, "_forward_names", False) is False:  # looked up once: None when forward takes **kwargs
            try:
                params = inspect.signature(self.model.forward).parameters.values()
            except (TypeError, ValueError):
                params = ()
            names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            takes_any = not params or any(p.kind is p.VAR_KEYWORD for p in params)
            self._forward_names = None if takes_any else names
        if self._forward_names is None:
            return
        extra = [k for k in kwargs if k not in self._forward_names]
        if extra:
            raise DataError(
                f"the batch has keys {extra} that are passed to the model as keyword arguments, and "
                f"{type(self.model).__name__}.forward has no parameter of that name (it takes {sorted(self._forward_names)}); "
                f"drop them (a datasets.Dataset: ds.remove_columns({extra!r})), or name the labels / sample weights "
                f"with label_key= / weight_key= (now {self.label_key!r} / {self.weight_key!r})"
            )

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

    def check_runs(self, example: Batch, what: str) -> Any:
        """Run the model once on ``example`` (a batch of one; eval mode, gradients on, since a
        forward may differentiate) before any long work; returns its outputs (:meth:`forward`).

        Raises:
            hessfree.errors.DataError: the model fails on it (inputs of another
                width, a missing column); names ``what``, the example's shapes and
                the model's own error.
        """
        model = self.model
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            example = to_device(example, device)
        try:
            with eval_mode(model):  # gradients on: a forward may differentiate (forces from an energy)
                return self.forward(model, example)
        except HessfreeError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the user's model on the user's data
            raise DataError(f"the model fails on {what} example 0 ({_shapes(example)}): {type(e).__name__}: {e}; "
                            f"check that the {what} data has the columns and shapes the model takes") from e  # fmt: skip

    def check_data(self, source) -> None:
        """Validate a whole data source (labels, shapes) once, before any gradient
        is taken; raise naming the example index and value. No-op by default.

        Args:
            source: a :class:`hessfree.DataSource`.
        """

    def _labels_to_check(self, source, first: Batch | None = None) -> Any:
        """All labels of ``source`` when they can be read
        without loading items (tensor data, a loader over a ``TensorDataset``),
        else those of its first batch (``first``, if already loaded); the rest
        are checked batch by batch (:meth:`check_batch` and the loss)."""
        every = source.tensors_without_loading()
        if every is not None:
            return self.labels(every)
        return self.labels(first if first is not None else next(iter(source)))

    def check_batch(self, batch: Batch) -> None:
        """Validate a whole batch before per-example gradients are taken
        (data-dependent checks cannot run inside ``vmap``). No-op by default."""

    # ---- model and loss -----------------------------------------------------
    def forward(self, model: Callable, batch: Batch) -> Any:
        """Run ``model`` (a module or a functional stand-in) on ``batch``.

        Returns the model's outputs; for a ``ModelOutput`` or a dict with
        ``"logits"``, the logits. A 0-d output of a batch of one becomes
        ``(1,)`` and a 1-d output ``(K,)`` with ``K != 1`` becomes ``(1, K)``
        (what a forward ending in ``.squeeze()`` drops).
        """
        args, kwargs = self.inputs(batch)
        self._check_keywords(kwargs)
        out = _logits_of(model(*args, **kwargs))
        if isinstance(out, torch.Tensor) and out.dim() <= 1:
            out = _rows(out, batch_size_of(batch))
        return out

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


def _shapes(batch: Batch) -> str:
    """``"inputs (1, 6), labels (1,)"``: the shapes of a batch's tensors, for messages."""
    def shape(v: Any) -> str:
        return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__
    if isinstance(batch, Mapping):
        return ", ".join(f"{k!r} {shape(v)}" for k, v in batch.items())
    return ", ".join(f"{name} {shape(v)}" for name, v in zip(("inputs", "labels", "weights"), batch))
