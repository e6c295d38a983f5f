"""Diagnostics on the user's own model and data: can these scores be trusted?

* :func:`projection_quality`: how well a random projection (``Dense(k)``,
  ``Factorized(k)``) preserves the exact scores, and the ``k`` that would reach
  a target correlation.
* :func:`trust`: identity (Hessian-free) scores against curvature-corrected
  ones, optionally checked against retraining, ending in a verdict.
"""

from .projection import ProjectionQuality, ProjectionQualityWarning, projection_quality
from .trust import TrustReport, trust

__all__ = ["ProjectionQuality", "ProjectionQualityWarning", "TrustReport", "projection_quality", "trust"]
