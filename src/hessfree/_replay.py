"""Whether a gradient rule is re-running a layer right now (thread-local).

The factorized engine re-runs a normalisation layer at weight 1 and bias 0 to read its
normalised output; forward hooks that change outputs (the dropout members' masks) must stand
aside meanwhile. The engine sets the flag with :func:`replay`; hooks read :func:`replaying`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


def replaying() -> bool:
    """True while a rule re-runs a layer to read its normalised output."""
    return getattr(_state, "active", False)


@contextmanager
def replay() -> Iterator[None]:
    """Mark the enclosed block as a rule's re-run of a layer (see :func:`replaying`)."""
    _state.active = True
    try:
        yield
    finally:
        _state.active = False
