"""Detection and agreement metrics, and ground truth by retraining (LOO, LDS).

The definitions live in ``hessfree.evaluation.metrics`` and
``hessfree.evaluation.ground_truth``; this module re-exports both under their
established names. ``scores`` given to the detection metrics are suspicion scores:
HIGHER = more suspicious. To evaluate influence scores (positive = helps), pass
their negation.
"""

from .evaluation import (
    LDSResult,
    average_precision,
    cosine,
    lds,
    lds_score,
    loo,
    pearson,
    recall_at_k,
    retrain_subsets,
    roc_auc,
    sign_agreement,
    spearman,
    subset_masks,
)

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
