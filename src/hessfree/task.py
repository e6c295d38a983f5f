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

What the model returns: a tensor, or (Hugging Face ``transformers``) a
``ModelOutput`` / dict with ``logits``, which are read and passed on as the
outputs. A forward that ends in ``.squeeze()`` is fine: with one example per
batch its 0-d (or 1-d) output is given back its batch dimension.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch, batch_size_of, map_batch, slice_batch
from .errors import HessfreeError, LabelError

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


def _tensor_outputs(out: Any, task: Task) -> torch.Tensor:
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


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def _example_outputs(task: Task, example: Batch) -> torch.Tensor:
    """``task.model``'s outputs for a batch of one (no gradient, eval mode, on the model's device)."""
    model = task.model
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        example = map_batch(example, lambda t: t.to(device))
    with torch.no_grad(), _eval_mode(model):
        return _tensor_outputs(task.forward(model, example), task)


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
    where = f"example {i} of the batch" if offset is None else f"example {offset + i}"
    if isinstance(v, float) and not v.is_integer():  # also NaN and infinity
        raise LabelError(
            f"{where} has label {_fmt(v) if math.isfinite(v) else v}; class labels must be integers "
            f"0 to {hi - 1} (a fractional label would be truncated to a class). Soft targets need hf.Task with "
            "your own loss_fn"
        )
    if n_out == 1:
        raise LabelError(
            f"{where} has label {_fmt(v)}, but the model has one output (a binary logit): labels must be 0 or 1; "
            "for more classes give the model one output per class"
        )
    raise LabelError(
        f"{where} has label {_fmt(v)}, but the model has {n_out} outputs (labels 0 to {n_out - 1}); "
        "fix the label or give the model one output per class"
    )


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
            where = f"example {i} of the batch" if offset is None else f"example {offset + i}"
            value = labels[i].tolist()
            raise LabelError(f"{where} has a label that is not finite ({value}); fix or drop the example")

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
