"""Find training examples whose label is probably wrong, and suggest a better one.

Suspicion scores (HIGHER = more likely mislabelled; this is the one place where
a larger number is worse, and the report says so):

* ``method="auto"`` (default): ``"self"`` without validation data; with it,
  ``"class_utility"`` when the noise looks systematic and ``"self"``
  otherwise (the test is described below).
* ``method="self"``: output-space self-influence
  ``sum_m w_m ||d l_i / d f(x_i; theta_m)||^2`` (:mod:`hessfree.output_space`:
  for softmax cross-entropy ``||softmax - onehot(y_i)||^2``, in [0, 2] per
  member), summed over members with their weights (TracIn-CP over
  checkpoints), minus its median over the examples with the same given label
  (so a class that is hard as a whole does not crowd out the flips hidden in
  an easy one). A class with fewer than ``MIN_CENTRED_CLASS`` (5) examples
  is not centred: the median of so few is set by the examples themselves (a
  class of one would be centred to exactly 0, a mislabelled singleton ranked
  in the middle), so their raw score is kept, and the report lists them in
  ``uncentred_classes``.
* ``method="self_weights"``: parameter-space self-influence
  ``||grad_theta l(z_i; theta_m)||^2`` of the selected parameters, aggregated
  over members as the mean of the logarithm (the default before this study
  showed the output-space form to be better).
* ``method="utility"``: the seed paper's form, minus the influence on the
  validation loss, ``-sum_m w_m g_i . grad L_val``.
* ``method="class_utility"``: minus the influence on the validation examples
  of the class that the example hurts most,
  ``-min_c sum_m w_m g_i . mean_{j: y_j = c} g_j``.
* ``method="combined"``: ``z(self) + z(class_utility)`` with ``z`` the
  z-score over the training set: self-influence catches flips the model
  resists, the class-wise utility catches class-dependent (systematic) flips
  that the model learns as a pattern and self-influence misses.

Why the default is output-space self-influence: on the study (digits and
MNIST 5k, symmetric 10/20/40% noise, a model trained long enough to memorise
the flips, class-dependent noise) it has the best average precision of every
label-free method, the peers included, in every symmetric setting but one,
where it is 0.001 behind.
The parameter-space form multiplies it by the
squared size of the example's features (``||h_i||^2 + 1`` for the output
layer), which varies with the input and not with the label, and its log-mean
over checkpoints lets the late checkpoints, where memorised flips are fitted,
outweigh the early ones where they stand out. No label-free score finds
class-dependent flips (c -> c+1) well, because the model learns them as a
pattern; with trusted validation data ``class_utility`` or ``combined`` does.

The test behind ``"auto"``: the plain utility score ranks flips well only
when they hurt the mean validation loss coherently, i.e. when the noise is
systematic (the cancellation explained below does not happen). So when the
10% most suspicious by ``class_utility`` overlap more with the 10% by
``utility`` than with the 10% by ``self`` (summed, before the class
centring), the noise is taken to be systematic and ``class_utility`` is used;
otherwise ``self`` without its class centring (the centring is a hedge against
systematic noise that cannot be checked without validation data; under
symmetric noise it costs up to 0.005 AP). The two overlaps are kept
in ``NoisyLabelReport.diagnostics``. On the study the test picked the right
side in every setting and seed (docs/applications.md).

Why the utility form is not the default: a mislabelled example (true class a, given
label b) helps the validation examples of class b and hurts those of class a.
The mean validation gradient adds the two, and they largely cancel, so the
plain utility score separates flips poorly; looking at the worst class
(``class_utility``) removes the cancellation. Self-influence needs no
validation data and, summed over checkpoints, measures how long the example
resisted being fitted. See docs/applications.md for the measurements.

Suggested label: ``suggest="members"`` (default) takes the class with the
highest probability averaged over the members (with checkpoints: over the
whole training run; with no members this is the model's prediction);
``suggest="prediction"`` takes the final model's prediction;
``suggest="influence"`` takes the label ``c`` under which the
example would help the validation loss most,
``argmax_c sum_m w_m grad l((x_i, c); theta_m) . grad L_val`` (the training
data itself is the target when no validation data is given). On MNIST 5k with
10% flips the prediction recovers the true label of 78% of the flipped
examples and the influence rule 27% (benchmarks/noisy_labels_why.py): at a trained model the validation
gradient is dominated by the validation examples the model still gets wrong,
so "helps most" points at the classes that are under-fitted near ``x_i``,
not at its true class. The final model, in turn, has already started to fit
some flips; averaged over the epoch checkpoints the prediction recovers the
true label of more flipped examples in every setting of the study (MNIST 5k,
10% symmetric: 0.91 against the final model's 0.79; 40 epochs, where the
final model has memorised them: 0.23 against 0.01). Hence the default.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data import DataSource
from ..influence import Influence
from ..members import as_members
from ..output_space import member_probabilities
from ..targets import Utility
from ..task import Task
from ..training import predict
from ._common import percentile_ranks, split_xy
from ._noisy_methods import MIN_CENTRED_CLASS as MIN_CENTRED_CLASS
from ._noisy_methods import _auto, _forward_kwargs, _small_classes, _suspicion
from ._noisy_methods import _top_overlap as _top_overlap
from .noisy_report import NoisyLabelReport

METHODS = ("auto", "self", "self_weights", "utility", "class_utility", "combined")
SUGGESTIONS = ("members", "prediction", "influence")


def suggest_labels(
    task: Task,
    x: torch.Tensor,
    n_classes: int,
    target_data: tuple,
    members: Any = None,
    params: Any = "last",
    **influence_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every example under every candidate label.

    Returns:
        ``(suggested, scores)``: ``(n,)`` the label with the highest influence
        on the utility of ``target_data`` and ``(n, n_classes)`` those
        influences (positive = helps; target units per unit learning rate).
    """
    target = Utility(target_data)
    scores = np.zeros((x.shape[0], n_classes))
    for c in range(n_classes):
        est = Influence(task, members=members, params=params, **influence_kwargs)
        est.fit((x, torch.full((x.shape[0],), c, dtype=torch.long)))
        scores[:, c] = est.influence(target, reduce="sum")
    return scores.argmax(1), scores


def find_noisy_labels(
    task: Task,
    train: Any,
    val: Any = None,
    members: Any = None,
    *,
    method: str = "auto",
    params: Any = "last",
    suggest: str = "members",
    n_classes: int | None = None,
    **influence_kwargs: Any,
) -> NoisyLabelReport:
    """Rank training examples by how likely their label is wrong.

    Args:
        task: a :class:`hessfree.ClassificationTask` around the trained model.
        train: ``(X, y)`` training data, ``(n, ...)`` and ``(n,)`` integer labels.
        val: optional ``(X_val, y_val)`` held-out data with labels you trust;
            needed by the utility methods, used for the suggested labels.
        members: ``None`` (the model as it is) or :mod:`hessfree.members`;
            ``Checkpoints(result.checkpoints, result.lrs)`` from training is the
            recommended choice (self-influence TracIn-CP).
        method: ``"auto"`` (default), ``"self"``, ``"self_weights"``,
            ``"utility"``, ``"class_utility"`` or ``"combined"`` (see the module docstring for what each computes
            and why; with trusted validation data and noise that may be
            class-dependent, ``"combined"`` is the safer choice).
        params: parameters whose gradients are used by every method but
            ``"self"`` (which needs none); default ``"last"`` (the output
            layer: fast, and in our measurements as good as all of them).
        suggest: ``"members"`` (default: the class of highest probability
            averaged over the members; the model's prediction without
            members), ``"prediction"`` (the model's prediction) or
            ``"influence"`` (the label under which the example helps most;
            ``n_classes`` extra passes over the training data).
        n_classes: number of classes (default ``max(y) + 1``).
        **influence_kwargs: passed to :class:`hessfree.Influence`
            (``batch_size``, ``device``, ``progress``, ...).

    Returns:
        A :class:`NoisyLabelReport`, most suspicious first.

    Raises:
        hessfree.errors.LabelError: a training or validation label outside the
            model's classes, fractional, or of another shape than ``(n,)`` /
            ``(n, 1)`` (``task.check_data``, before any scoring).
    """
    if suggest not in SUGGESTIONS:
        raise ValueError(f"suggest must be one of {SUGGESTIONS}, got {suggest!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x, y = split_xy(train, "train")
    task.check_data(DataSource((x, y), name="train"))  # labels in the model's classes, before any long work
    y = task.labels((x, y)).long()
    valt = None
    if val is not None:
        xv, yv = split_xy(val, "val")
        task.check_data(DataSource((xv, yv), name="val"))
        valt = (xv, task.labels((xv, yv)).long())
    k = int(n_classes if n_classes is not None else int(y.max()) + 1)
    if valt is not None:
        k = max(k, int(valt[1].max()) + 1)
    fitted: list[Influence] = []

    def est() -> Influence:
        if not fitted:
            fitted.append(Influence(task, members=members, params=params, **influence_kwargs).fit((x, y)))
        return fitted[0]

    diagnostics: dict[str, float] = {}
    resolved = method
    if method == "auto" and valt is not None:
        score, rows, resolved, diagnostics = _auto(est, valt, (x, y), task, members, influence_kwargs)
    else:
        if method == "auto":
            resolved = "auto -> self"
        score, rows = _suspicion(est, "self" if method == "auto" else method, valt, (x, y), task, members, influence_kwargs)
    uncertainty = percentile_ranks(rows).std(0) if rows.shape[0] > 1 else np.zeros_like(score)
    predicted = predict(task.model, x).numpy()
    if suggest == "influence":
        suggested, _ = suggest_labels(
            task, x, k, valt if valt is not None else (x, y), members, params, **influence_kwargs
        )
    elif suggest == "members":
        suggested = member_probabilities(task, (x, y), members, **_forward_kwargs(influence_kwargs)).argmax(1)
    else:
        suggested = predicted
    order = np.argsort(-score, kind="stable")
    centred = resolved in ("self", "combined", "auto -> self")
    return NoisyLabelReport(
        index=order,
        score=score[order],
        uncertainty=uncertainty[order],
        given_label=y.numpy()[order],
        suggested_label=np.asarray(suggested)[order],
        predicted_label=predicted[order],
        method=resolved,
        diagnostics=diagnostics,
        members=[spec.name for spec in as_members(members).specs()],
        uncentred_classes=_small_classes(y.numpy()) if centred else [],
        estimator=fitted[0].arguments.to_dict() if fitted else None,
    )


__all__ = ["METHODS", "SUGGESTIONS", "NoisyLabelReport", "find_noisy_labels", "suggest_labels"]
