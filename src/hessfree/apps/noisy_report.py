"""NoisyLabelReport: the result of :func:`hessfree.apps.find_noisy_labels`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import integer
from ._noisy_methods import MIN_CENTRED_CLASS


@dataclass
class NoisyLabelReport:
    """Training examples ranked by suspicion, most suspicious first.

    Every array has shape ``(n_train,)`` and row ``r`` describes training
    example ``index[r]``.

    Attributes:
        index: position of the example in the training data.
        score: suspicion (HIGHER = more likely mislabelled). For ``"self"``:
            output-space self-influence summed over members minus its median
            in the example's given class (nats² per logit² times learning
            rate); for ``"self_weights"``: mean over members of ``log``
            self-influence (log of nats² per parameter²); for the utility
            methods: minus the influence (target units per unit learning
            rate); for ``"combined"``: a sum of two z-scores (unitless).
        uncertainty: disagreement of the members on the example's rank: the
            standard deviation across members of its percentile rank, in
            [0, 0.5] (0 with one member).
        given_label: the label in the training data.
        suggested_label: the suggested correct label (see ``suggest``).
        predicted_label: the model's prediction (for comparison).
        method: how ``score`` was computed (``"auto -> self"`` without
            validation data; with it ``"auto -> self, not centred"`` or
            ``"auto -> class_utility"``).
        members: names of the members.
        diagnostics: for ``"auto"`` with validation data, the top-10%
            overlaps (shares in [0, 1]) that decided the method.
        uncentred_classes: the given labels whose examples kept their raw
            score because the class has fewer than ``MIN_CENTRED_CLASS``
            training examples (only where the score is class-centred:
            ``"self"``, ``"combined"`` and ``"auto"`` without validation data).
            Their raw score is at least what centring would give, so they rank
            higher than they would in a large class: worth a look either way.
        estimator: the options of the :class:`hessfree.Influence` behind the scores
            (``InfluenceArguments.to_dict()``); ``None`` when no estimator was used.
        n_train: the number of training examples ranked (``None``: ``len(index)``,
            a full report); a :meth:`top` report holds fewer rows than that, and the
            methods that need every example (training order, the noise share) refuse it.
    """

    index: np.ndarray
    score: np.ndarray
    uncertainty: np.ndarray
    given_label: np.ndarray
    suggested_label: np.ndarray
    predicted_label: np.ndarray
    method: str
    members: list[str] = field(default_factory=list)
    diagnostics: dict[str, float] = field(default_factory=dict)
    uncentred_classes: list[int] = field(default_factory=list)
    estimator: dict | None = None
    n_train: int | None = None

    _COLUMNS = ("index", "score", "uncertainty", "given_label", "suggested_label", "predicted_label")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def total(self) -> int:
        """The number of training examples ranked (``len(self)`` for a full report)."""
        return len(self) if self.n_train is None else int(self.n_train)

    def _need_full(self, what: str) -> None:
        if len(self) != self.total:
            raise ValueError(f"{what} needs every training example, and this report holds the top {len(self)} of "
                             f"{self.total}; call it on the full report (before top())")  # fmt: skip

    def top(self, k: int) -> NoisyLabelReport:
        """The ``k`` most suspicious rows."""
        k = integer(k, "k", 0)
        cols = {c: getattr(self, c)[:k] for c in self._COLUMNS}
        return NoisyLabelReport(
            **cols, method=self.method, members=self.members, diagnostics=self.diagnostics,
            uncentred_classes=self.uncentred_classes, estimator=self.estimator, n_train=self.total,
        )  # fmt: skip

    def flagged(self, fraction: float | None = None) -> np.ndarray:
        """Training indices of the ``fraction`` most suspicious examples, ``(k,)``.

        ``fraction=None``: the :meth:`estimated_noise_share`.
        """
        if fraction is None:
            fraction = self.estimated_noise_share()
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"flagged: fraction must be in [0, 1], got {fraction}")
        k = int(round(fraction * self.total))  # a share of every training example, also for a top() report
        if k > len(self):
            raise ValueError(f"flagged: fraction {fraction:g} of {self.total} examples is {k} rows, and this report "
                             f"holds the top {len(self)}; call it on the full report")  # fmt: skip
        return self.index[:k]

    def estimated_noise_share(self) -> float:
        """Share of training examples (in [0, 1]) whose suggested label differs
        from the given one: an estimate of the share of wrong labels when you
        do not know it.

        It also counts the clean examples the members get wrong, so it errs
        somewhat high (noisy-label study, seed 0, with checkpoints: MNIST 5k
        with 10 / 20 / 40% flipped, 0.117 / 0.220 / 0.415; digits 0.138 /
        0.235 / 0.429), and it misses the flips the members have fitted: low
        under class-dependent noise (MNIST 5k, 20%: 0.147) and far too low once a
        long-trained model has memorised them (40 epochs: 0.022 for 10%).
        See docs/applications.md.
        """
        self._need_full("estimated_noise_share")
        return float(np.mean(self.suggested_label != self.given_label))

    def suspicion(self) -> np.ndarray:
        """Suspicion scores in TRAINING order, ``(n_train,)`` (for metrics)."""
        self._need_full("suspicion")
        out = np.empty(len(self))
        out[self.index] = self.score
        return out

    def suggestions(self) -> np.ndarray:
        """Suggested labels in training order, ``(n_train,)``."""
        self._need_full("suggestions")
        out = np.empty(len(self), dtype=np.int64)
        out[self.index] = self.suggested_label
        return out

    def to_dict(self) -> dict[str, Any]:
        """Columns as lists (JSON-friendly)."""
        d = {c: getattr(self, c).tolist() for c in self._COLUMNS}
        d.update(
            method=self.method, members=list(self.members), diagnostics=dict(self.diagnostics),
            uncentred_classes=list(self.uncentred_classes), estimator=self.estimator, n_train=self.total,
        )  # fmt: skip
        return d

    def summary(self) -> str:
        """A few lines: the method, the estimated share of wrong labels, the
        most suspicious examples and the classes left uncentred."""
        full = len(self) == self.total
        lines = [
            f"{len(self)} {'' if full else f'most suspicious of {self.total} '}training examples ranked by suspicion "
            f"(method {self.method}; higher = more likely mislabelled)",
        ]
        if full:
            lines.append(f"estimated share of wrong labels: {self.estimated_noise_share():.1%}")
        top = self.top(5)
        rows = ", ".join(f"{i} (label {g} -> {s})" for i, g, s in zip(top.index, top.given_label, top.suggested_label))
        lines.append(f"most suspicious: {rows}")
        if self.uncentred_classes:
            which = ", ".join(f"class {c}" for c in self.uncentred_classes)
            lines.append(
                f"not centred (fewer than {MIN_CENTRED_CLASS} training examples, raw self-influence kept): {which}"
            )
        return "\n".join(lines)

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per row, most suspicious first."""
        cols = [getattr(self, c).tolist() for c in self._COLUMNS]
        return [dict(zip(self._COLUMNS, row)) for row in zip(*cols)]

    def to_pandas(self):
        """A ``pandas.DataFrame`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame({c: getattr(self, c) for c in self._COLUMNS})
