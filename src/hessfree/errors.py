"""The named errors hessfree raises (one home; re-exported at the top level).

Every error says what was wrong, with the offending value, and what to do.
"""

from __future__ import annotations


class HessfreeError(Exception):
    """Base class of hessfree's own errors."""


class NotFittedError(HessfreeError, RuntimeError):
    """A score was asked for before :meth:`hessfree.Influence.fit`."""


class EngineError(HessfreeError, ValueError):
    """A per-example gradient engine cannot handle this model; the message names
    the module (or the failure) and the engine that works."""


class ModelChangedError(HessfreeError, RuntimeError):
    """The model's parameters changed after :meth:`hessfree.Influence.fit`; the
    stored features no longer describe it. Call ``fit`` again."""


class DataError(HessfreeError, ValueError):
    """The training or target data cannot be used as given (a column of strings,
    rows of different lengths, a loader that does not yield examples 0..n-1 in
    order); the message names the column or example and what to do."""


class LabelError(DataError):
    """A label does not fit the task (a class outside the model's outputs, a
    fractional class, a missing value, a label of the wrong shape); the message
    names the example index and the value."""


__all__ = ["DataError", "EngineError", "HessfreeError", "LabelError", "ModelChangedError", "NotFittedError"]
