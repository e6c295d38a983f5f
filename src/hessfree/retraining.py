"""Ground truth by retraining: leave-one-out (or leave-group-out) and the linear
datamodeling score (LDS). Defined in ``hessfree.evaluation.ground_truth``; re-exported here."""

from .evaluation.ground_truth import LDSResult, MeasureFn, TrainFn, lds, lds_score, loo, retrain_subsets, subset_masks

__all__ = ["LDSResult", "MeasureFn", "TrainFn", "lds", "lds_score", "loo", "retrain_subsets", "subset_masks"]
