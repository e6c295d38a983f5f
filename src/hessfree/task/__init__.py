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

from .base import LossFn, Task
from .classification import ClassificationTask
from .regression import RegressionTask

__all__ = ["ClassificationTask", "LossFn", "RegressionTask", "Task"]

# Stores record a task by its import path (``hessfree.task.ClassificationTask``); keep it.
for _cls in (Task, ClassificationTask, RegressionTask):
    _cls.__module__ = __name__
del _cls
