"""Train / eval mode inside a block, with every submodule's own mode restored after.

``module.train(was)`` restores only the top-level flag and pushes it down to every
child, so a submodule the user had set apart (a BatchNorm frozen with ``.eval()``
while the rest trains) would come back in the wrong mode and, on the next
training step, update its running statistics again. These helpers save and
restore the flag of each submodule.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``module.train(training)`` inside the block; each submodule's flag as it was after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, was in modes:
            m.training = was


def eval_mode(module: nn.Module):
    """``module`` in eval mode inside the block (see :func:`module_mode`)."""
    return module_mode(module, False)
