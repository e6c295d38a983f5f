"""Optimizer-aware training features: per-example Adam update directions (LESS).

LESS (Xia et al., 2024, "LESS: Selecting Influential Data for Targeted Instruction
Tuning") scores a training example by the Adam update it would cause rather than
by its raw gradient; :class:`AdamDirections` is that map, plugged into
``hf.Influence(..., train_map=AdamDirections(states))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def adam_state(model: nn.Module, path: Path) -> dict[str, Any]:
    """The AdamW moments saved with a warm-up checkpoint, keyed by parameter name:
    ``{"m": {name: tensor}, "v": {...}, "step": {name: int}, "betas": (b1, b2), "eps": eps}``."""
    saved = torch.load(path, map_location="cpu", weights_only=True)["optimizer"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    group = saved["param_groups"][0]
    out: dict[str, Any] = {"m": {}, "v": {}, "step": {}, "betas": tuple(group["betas"]), "eps": float(group["eps"])}
    for idx, name in zip(group["params"], names):
        st = saved["state"][idx]
        out["m"][name], out["v"][name], out["step"][name] = st["exp_avg"], st["exp_avg_sq"], int(st["step"])
    return out


def adam_direction(grads: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-example Adam update directions ``{name: (B, *shape)}`` from per-example gradients
    (see :class:`SelectionConfig` ``optimizer_aware``)."""
    b1, b2 = state["betas"]
    out = {}
    for n, g in grads.items():
        t = state["step"][n] + 1
        m = (b1 * state["m"][n].to(g) + (1 - b1) * g) / (1 - b1**t)
        v = (b2 * state["v"][n].to(g) + (1 - b2) * g * g) / (1 - b2**t)
        out[n] = m / (v.sqrt() + state["eps"])
    return out


class AdamDirections:
    """A training feature map: projected per-example Adam update directions, one
    Adam state per member (``Influence(..., train_map=AdamDirections(states))``;
    queries stay plain gradients). LESS (Xia et al., 2024) scores with these.

    Args:
        states: per member, :func:`adam_state` of its checkpoint.
    """

    def __init__(self, states: Sequence[dict[str, Any]]):
        self.states = list(states)

    def __call__(self, feature_map, view, batch) -> torch.Tensor:
        grads = feature_map.per_example_grads(view, batch)
        return feature_map.project_grads(adam_direction(grads, self.states[view.member_index]))

    def __repr__(self) -> str:
        return f"AdamDirections(members={len(self.states)})"
