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


__all__ = ["EngineError", "HessfreeError", "ModelChangedError", "NotFittedError"]
