"""The settings and the result of :func:`hessfree.selection.select`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._checks import integer

SIMILARITIES = ("cosine", "dot")
COMBINES = ("max", "balanced")


@dataclass
class SelectionConfig:
    """Settings of :func:`select` (saved as ``config.json`` in the work folder).

    Attributes:
        fraction: share of the pool to select, in (0, 1].
        warmup_fraction: share of the pool the LoRA warm-up trains on.
        warmup_epochs: warm-up epochs = number of checkpoints (TracIn-CP members).
        lr: peak AdamW learning rate of the warm-up (decays linearly to 0).
        weight_decay: AdamW weight decay.
        lora_r, lora_alpha, lora_targets: the LoRA adapter added when the model has none.
        projection_dim: total projected dimension ``k`` (over all LoRA matrices).
        similarity: ``"cosine"`` (default, as LESS) or ``"dot"``.
        combine: how several target tasks share the budget: ``"balanced"``
            (default: tasks take turns, in name order, each adding its best
            not yet selected example, so each gets an equal share) or
            ``"max"`` (LESS: rank by each example's maximum score over tasks;
            a task whose gradients align more strongly can take every slot,
            which on the study in docs/llm_selection.md left the other task
            worse than random selection).
        optimizer_aware: score the Adam update direction of each pool example
            instead of its gradient (LESS): at checkpoint c with Adam moments
            ``m, v`` after ``t`` steps, ``u = m_hat / (sqrt(v_hat) + eps)`` with
            ``m_hat = (b1 m + (1 - b1) g) / (1 - b1^(t+1))`` and likewise ``v_hat``
            with ``g^2``. Needs full per-example LoRA gradients (``vmap``) before
            projection; validation examples keep plain gradients.
        batch_size: examples per batch (warm-up steps and featurization).
        max_length: tokens per example (responses are truncated, never prompts).
        reduction: per-example loss, ``"mean"`` (nats per response token) or ``"sum"``.
        seed: seeds the warm-up subset, its order, the adapter and the projection.
    """

    fraction: float = 0.05
    warmup_fraction: float = 0.05
    warmup_epochs: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    projection_dim: int = 8192
    similarity: str = "cosine"
    combine: str = "balanced"
    optimizer_aware: bool = False
    batch_size: int = 8
    max_length: int = 256
    reduction: str = "mean"
    seed: int = 0

    def validate(self) -> None:
        for name in ("fraction", "warmup_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {v!r} (e.g. 0.05 for 5%)")
        for name in ("warmup_epochs", "lora_r", "projection_dim", "batch_size", "max_length"):
            setattr(self, name, integer(getattr(self, name), name))
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class Selection:
    """Result of :func:`select`.

    Attributes:
        indices: ``(n_selected,)`` pool row numbers in selection order (best first for
            ``combine="max"``; for ``"balanced"`` the order the tasks took turns in).
        scores: ``(n_pool,)`` selection score of every pool row (max over tasks).
        task_scores: task name -> ``(n_pool,)`` TracIn-CP score (units: summed
            learning rate times similarity; positive = helps that task).
        checkpoints: paths of the warm-up checkpoints.
        lrs: their learning rates (the TracIn-CP weights).
        timings: seconds per stage.
    """

    indices: np.ndarray
    scores: np.ndarray
    task_scores: dict[str, np.ndarray]
    checkpoints: list[str]
    lrs: list[float]
    timings: dict[str, float]
