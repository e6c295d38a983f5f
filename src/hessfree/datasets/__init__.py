"""Offline data sets and label-noise injection.

Every loader works without network access, from files that ship inside PyPI
packages. A loader whose package is missing raises ``ImportError`` naming the
extra to install.
"""

from .noise import flip_labels
from .vision import digits

__all__ = ["digits", "flip_labels"]
