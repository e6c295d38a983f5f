"""Detection and agreement metrics, and ground truth by retraining (LOO, LDS).

The definitions live in ``hessfree.evaluation.metrics`` and
``hessfree.evaluation.ground_truth``; this module re-exports both under their
established names. ``scores`` given to the detection metrics are suspicion scores:
HIGHER = more suspicious. To evaluate influence scores (positive = helps), pass
their negation.
"""

from . import evaluation
from .evaluation import *  # noqa: F403  (the names of hessfree.evaluation, under their established path)

__all__ = list(evaluation.__all__)
