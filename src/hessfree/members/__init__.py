"""Ensemble members: perturbed or saved copies of the model whose scores are summed.

A member is one set of parameters (plus, for dropout members, fixed activation
masks) at which gradients are taken. The score of a training example is

    score_i = sum_m w_m * grad l(z_i; theta_m) . grad f(theta_m)

with ``w_m`` the member weight (the learning rate for checkpoints, 1 otherwise).

Member collections combine with ``*`` (or a list): ``Checkpoints(...) * Dropout(n=5)``
gives every checkpoint with every dropout mask, weights multiplied.
"""

from .checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_SAFE_WEIGHTS,
    ADAPTER_WEIGHTS,
    SAFE_WEIGHTS,
    SAFE_WEIGHTS_INDEX,
    WEIGHTS,
    WEIGHTS_INDEX,
    StateLike,
    load_checkpoint,
)
from .recipes import (
    AsIs,
    Checkpoints,
    Dropout,
    DropoutMasks,
    Members,
    MemberSpec,
    Models,
    Product,
    WeightNoise,
    as_members,
)
from .views import MemberView, describe, member_views, model_device, single_view

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_SAFE_WEIGHTS",
    "ADAPTER_WEIGHTS",
    "SAFE_WEIGHTS",
    "SAFE_WEIGHTS_INDEX",
    "WEIGHTS",
    "WEIGHTS_INDEX",
    "AsIs",
    "Checkpoints",
    "Dropout",
    "DropoutMasks",
    "MemberSpec",
    "MemberView",
    "Members",
    "Models",
    "Product",
    "StateLike",
    "WeightNoise",
    "as_members",
    "describe",
    "load_checkpoint",
    "member_views",
    "model_device",
    "single_view",
]
