"""One-call applications of Hessian-free influence.

* :func:`find_noisy_labels`: rank training examples by how likely their label
  is wrong, with a suggested label for each;
* :func:`defend`: find and remove / relabel / reweight the training examples
  that make a model weak under attack, then retrain;
* :func:`attribute`: for each query of a fine-tuned causal language model, the
  training examples that helped it most (TracIn-CP over its checkpoints), with
  their per-checkpoint terms and, optionally, per response token;
* :func:`repair_fairness`: remove or reweight the examples that widen a group
  gap, then retrain, over a sweep of fractions.

:func:`find_noisy_labels`, :func:`defend` and :func:`repair_fairness` accept
``**influence_kwargs`` passed to :class:`hessfree.Influence`, so any estimator
option applies.
"""

from .attribution import AttributionReport, AttributionSettingsError, attribute
from .defense import DefenseResult, default_attack, defend
from .fairness import FairnessPoint, FairnessResult, group_gap, repair_fairness
from .noisy_labels import NoisyLabelReport, find_noisy_labels, suggest_labels

__all__ = [
    "AttributionReport",
    "AttributionSettingsError",
    "DefenseResult",
    "FairnessPoint",
    "FairnessResult",
    "NoisyLabelReport",
    "attribute",
    "default_attack",
    "defend",
    "find_noisy_labels",
    "group_gap",
    "repair_fairness",
    "suggest_labels",
]
