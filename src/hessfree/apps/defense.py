"""The seed paper's defence: find the training examples that make the model weak
under attack and remove / relabel / reweight them, then retrain.

1. Train the model on all the training data (the recipe of ``train_kwargs``).
2. Attack a random share ``attack_share`` of the held-out set (the "attack
   draw", seeded by ``attack_seed``) and use it as a
   :class:`hessfree.targets.Robustness` target: the loss on the attacked points
   (plus ``clean_weight`` times the loss on the same points unattacked, so the
   repair does not buy robustness with clean accuracy).
3. Score the training data (positive = helps robustness) and act on the
   ``fraction`` most harmful examples.
4. Retrain with the same recipe and seed; report clean accuracy and accuracy on
   the attacked test set, before and after.

Accuracy under attack is measured on the test points attacked against the
ORIGINAL model (a fixed set, as in the seed paper) and, for attacks with a
bounded budget (FGSM / PGD), also against the retrained model (adaptive).
A minimal-perturbation attack succeeds against any model by construction, so
its adaptive accuracy is not reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import number
from ..attacks import PGD, Attack, LinearMinimal
from ..influence import Influence
from ..targets import Robustness, Utility
from ..task import ClassificationTask
from ..training import accuracy
from ._common import split_xy
from ._retrain import curate, fit_model


@dataclass
class DefenseResult:
    """Before / after numbers of one defence run (accuracies in [0, 1]).

    Attributes:
        action, strategy, fraction: what was done (``strategy="random"`` is the
            random-removal baseline) and the share of training data acted on.
        indices: training indices acted on, most harmful first.
        clean_acc_before, clean_acc_after: test accuracy without attack.
        attacked_acc_before, attacked_acc_after: accuracy on the test points
            attacked against the original model.
        adaptive_acc_before, adaptive_acc_after: accuracy under the attack run
            against the original model (equal to ``attacked_acc_before``) and re-run
            against the retrained model (both ``None`` for minimal-perturbation attacks).
        attack: the attack, in words.
        attack_seed: seed of the draw of attacked held-out points.
        estimator: the options of the :class:`hessfree.Influence` behind the scores
            (``InfluenceArguments.to_dict()``); ``None`` when no estimator was used.
    """

    action: str
    strategy: str
    fraction: float
    indices: np.ndarray
    clean_acc_before: float
    clean_acc_after: float
    attacked_acc_before: float
    attacked_acc_after: float
    adaptive_acc_before: float | None
    adaptive_acc_after: float | None
    attack: str
    attack_seed: int
    estimator: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["indices"] = self.indices.tolist()
        return d


def _scale(scores: np.ndarray) -> float:
    std = float(np.std(scores))
    return std if std > 0 else 1.0


def default_attack(model: nn.Module) -> Attack:
    """LinearMinimal for a binary classifier that is one ``nn.Linear`` with 1 or 2
    outputs (or a Sequential of one); PGD (L-inf, eps 0.25, 10 steps) otherwise
    (also for a multi-class linear model, which LinearMinimal cannot attack)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    others = [m for m in model.modules() if len(list(m.parameters(recurse=False))) and not isinstance(m, nn.Linear)]
    if len(linear) == 1 and not others and linear[0].out_features <= 2:
        return LinearMinimal(overshoot=0.3)
    return PGD(eps=0.25, steps=10)


def attacked(task: ClassificationTask, attack: Attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inputs of ``(x, y)`` attacked against ``task.model``, same shape as ``x``."""
    return Robustness((x, y), attack).adversarial(task)[0]


def defend(
    make_model: Callable[[], nn.Module],
    train: Any,
    val: Any,
    test: Any,
    *,
    action: str = "remove",
    fraction: float = 0.05,
    attack: Attack | None = None,
    attack_share: float = 0.5,
    attack_seed: int = 0,
    strategy: str = "influence",
    clean_weight: float = 2.0,
    members: Any = None,
    params: Any = None,
    seed: int = 0,
    train_kwargs: dict | None = None,
    base_model: nn.Module | None = None,
    **influence_kwargs: Any,
) -> DefenseResult:
    """Run the defence once.

    Args:
        make_model: builds a fresh, untrained classifier (called after
            ``torch.manual_seed(seed)``).
        train, val, test: ``(X, y)`` data; ``val`` is the held-out set the
            attacker's points are drawn from, ``test`` is for reporting.
        action: ``"remove"``, ``"relabel"`` (binary labels: flipped) or
            ``"reweight"`` (the worst share gets weight 0, the others
            ``clip(1 + 0.5 z, 0, 2)`` with ``z`` the z-scored score).
        fraction: share of the training data acted on.
        attack: an :mod:`hessfree.attacks` attack (default :func:`default_attack`).
        attack_share: share of ``val`` that is attacked and used as the target.
        strategy: ``"influence"`` or ``"random"`` (the baseline).
        clean_weight: the score is ``r / std(r) + clean_weight * u / std(u)``
            with ``r`` the influence on the loss at the attacked points and
            ``u`` on the loss at the same points unattacked (0: the seed
            paper's robustness-only score). Each is divided by its standard
            deviation over the training set, so the weight is unit-free.
        members, params, **influence_kwargs: passed to :class:`hessfree.Influence`.
        train_kwargs: passed to :func:`hessfree.training.train` (epochs, lr, ...).
        base_model: the model already trained on all of ``train`` with this
            recipe and seed (skips that training; for repeated runs).

    Returns:
        A :class:`DefenseResult`.
    """
    x, y = split_xy(train, "train")
    xv, yv = split_xy(val, "val")
    xt, yt = split_xy(test, "test")
    if not 0.0 < attack_share <= 1.0:
        raise ValueError(f"attack_share must be in (0, 1], got {attack_share}")
    clean_weight = number(clean_weight, "clean_weight", 0)  # a negative weight would favour hurting clean accuracy
    n_classes = int(max(int(y.max()), int(yt.max()))) + 1
    model = base_model if base_model is not None else fit_model(make_model, x, y, seed, train_kwargs)
    task = ClassificationTask(model)
    attack = attack if attack is not None else default_attack(model)
    rng = np.random.default_rng(attack_seed)
    chosen = torch.from_numpy(np.sort(rng.choice(len(yv), size=max(1, int(round(attack_share * len(yv)))), replace=False)))
    scores = None
    if strategy == "influence":
        est = Influence(task, members=members, params=params, **influence_kwargs).fit((x, y))
        scores = est.influence(Robustness((xv[chosen], yv[chosen]), attack))
        if clean_weight:
            clean = est.influence(Utility((xv[chosen], yv[chosen])))
            scores = scores / _scale(scores) + clean_weight * clean / _scale(clean)
    # the random baseline draws other rows for each attack draw (seed 0's rows for attack_seed 0, as before)
    kwargs, idx = curate(scores, y, action, fraction, strategy, seed + 7919 * attack_seed, n_classes)
    after = fit_model(make_model, x, y, seed, train_kwargs, **kwargs)
    xt_adv = attacked(task, attack, xt, yt)
    bounded = not isinstance(attack, LinearMinimal)
    adaptive_before = accuracy(model, xt_adv, yt) if bounded else None
    adaptive_after = accuracy(after, attacked(ClassificationTask(after), attack, xt, yt), yt) if bounded else None
    return DefenseResult(
        action=action,
        strategy=strategy,
        fraction=float(fraction),
        indices=np.asarray(idx),
        clean_acc_before=accuracy(model, xt, yt),
        clean_acc_after=accuracy(after, xt, yt),
        attacked_acc_before=accuracy(model, xt_adv, yt),
        attacked_acc_after=accuracy(after, xt_adv, yt),
        adaptive_acc_before=adaptive_before,
        adaptive_acc_after=adaptive_after,
        attack=repr(attack),
        attack_seed=int(attack_seed),
        estimator=est.arguments.to_dict() if strategy == "influence" else None,
    )
