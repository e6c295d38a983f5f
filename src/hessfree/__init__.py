"""hessfree: Hessian-free influence functions for PyTorch models.

Scores follow one sign convention everywhere: a positive score means the
training example HELPS the target (one SGD step on it lowers the target:
validation loss, a fairness gap, loss under attack).
"""

from . import (
    apps,
    attacks,
    curation,
    datasets,
    diagnostics,
    distributed,
    gradients,
    hessian,
    integrations,
    members,
    metrics,
    projections,
    selection,
    store,
    targets,
    training,
)
from .arguments import InfluenceArguments
from .data import DataSource
from .errors import DataError, EngineError, HessfreeError, LabelError, ModelChangedError, NotFittedError
from .influence import Influence
from .llm import LanguageModelTask
from .task import ClassificationTask, RegressionTask, Task

__version__ = "0.1.0"

__all__ = [
    "ClassificationTask",
    "DataError",
    "DataSource",
    "EngineError",
    "HessfreeError",
    "Influence",
    "InfluenceArguments",
    "LabelError",
    "LanguageModelTask",
    "ModelChangedError",
    "NotFittedError",
    "RegressionTask",
    "Task",
    "apps",
    "attacks",
    "curation",
    "datasets",
    "diagnostics",
    "distributed",
    "gradients",
    "hessian",
    "integrations",
    "members",
    "metrics",
    "projections",
    "selection",
    "store",
    "targets",
    "training",
]
