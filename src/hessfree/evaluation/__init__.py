"""Evaluation of influence scores: detection and agreement metrics (``metrics``) and
ground truth by retraining, leave-one-out and the linear datamodeling score (``ground_truth``).

``ground_truth`` uses ``metrics`` (Spearman correlation for the LDS); ``metrics`` imports
nothing from hessfree. ``hessfree.metrics`` and ``hessfree.retraining`` re-export these names.
"""

from .ground_truth import LDSResult, lds, lds_score, loo, retrain_subsets, subset_masks
from .metrics import average_precision, cosine, pearson, recall_at_k, roc_auc, sign_agreement, spearman

__all__ = [
    "LDSResult",
    "average_precision",
    "cosine",
    "lds",
    "lds_score",
    "loo",
    "pearson",
    "recall_at_k",
    "retrain_subsets",
    "roc_auc",
    "sign_agreement",
    "spearman",
    "subset_masks",
]
