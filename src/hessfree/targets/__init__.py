"""Targets: the differentiable quantity f(theta) that influence is measured against.

Lower f is better for every target (lower validation loss, smaller fairness
gap, lower loss under attack), so a positive influence score means a training
step on the example lowers f: the example helps.

A target is evaluated over its held-out data in batches. Each target returns
additive per-batch statistics (``sums``) and a function ``combine`` of their
totals; its exact gradient is then taken in two passes (totals first, then the
chain rule batch by batch), so held-out sets of any size fit in memory and
non-linear targets such as absolute group gaps stay exact.
"""

from __future__ import annotations

from .base import Target, Utility
from .custom import Custom
from .fairness import DemographicParity, EqualOpportunity, group_array
from .robustness import Robustness

__all__ = ["Custom", "DemographicParity", "EqualOpportunity", "Robustness", "Target", "Utility", "group_array"]
