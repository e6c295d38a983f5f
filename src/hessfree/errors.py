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
    order); the message names the column or example and what to do.

    An error about one example of a batch, raised where the batch's place in
    the data is not known, carries ``batch_index`` (its row in the batch) and
    ``message_at(where)``; :func:`at_offset` rewrites it with the example's
    index in the data.
    """

    batch_index: int | None = None

    @classmethod
    def in_batch(cls, index: int, message_at) -> DataError:
        """The error for row ``index`` of a batch; ``message_at(where)`` words it
        (``where`` is ``"example 3 of the batch"`` or, once known, ``"training example 131"``)."""
        err = cls(message_at(f"example {index} of the batch"))
        err.batch_index, err.message_at = index, message_at
        return err


def at_offset(err: DataError, offset: int, what: str) -> DataError:
    """``err`` reworded with the example's index in the data (``offset`` = the batch's first
    example); ``err`` itself when it does not name a row of a batch."""
    if err.batch_index is None:
        return err
    out = type(err)(err.message_at(f"{what} example {offset + err.batch_index}"))
    out.batch_index, out.message_at = None, err.message_at
    return out


class LabelError(DataError):
    """A label does not fit the task (a class outside the model's outputs, a
    fractional class, a missing value, a label of the wrong shape); the message
    names the example index and the value."""


__all__ = ["DataError", "EngineError", "HessfreeError", "LabelError", "ModelChangedError", "NotFittedError", "at_offset"]
