"""hessfree: Hessian-free influence functions for PyTorch models.

Scores follow one sign convention everywhere: a positive score means the
training example HELPS the target (one SGD step on it lowers the target:
validation loss, a fairness gap, loss under attack).
"""

from . import attacks, curation, hessian, members, metrics, targets
from .data import DataSource
from .influence import Influence, NotFittedError
from .task import ClassificationTask, RegressionTask, Task

__version__ = "0.1.0"

__all__ = [
    "ClassificationTask",
    "DataSource",
    "Influence",
    "NotFittedError",
    "RegressionTask",
    "Task",
    "attacks",
    "curation",
    "hessian",
    "members",
    "metrics",
    "targets",
]
