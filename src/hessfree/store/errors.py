"""The named errors of the gradient store."""

from __future__ import annotations

from ..errors import HessfreeError

REBUILD = "delete the folder (or pass a new store path) and run est.fit(train) to write it again"


class StoreError(HessfreeError, OSError):
    """The store cannot be used as asked (a path that is a file, a folder that
    cannot be written); the message names the path and the fix."""


class StoreMismatchError(StoreError, ValueError):
    """The store on disk was written with a different model, loss, data or
    configuration (the message names what differs), or is incomplete."""


class StoreFormatError(StoreMismatchError):
    """The store was written by an earlier version of hessfree, in a format
    whose fingerprints cannot be checked; rebuild it."""


class StoreCorruptError(StoreError):
    """A store file has the wrong size, or rows whose bytes no longer match the
    checksum recorded when they were written."""


class StoreFullError(StoreError):
    """Not enough disk space for the store (at open: the bytes needed and free),
    or a write ran out of space; nothing written is lost and ``fit`` resumes
    once space is freed."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the path given."""
