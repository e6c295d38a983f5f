"""Ground truth by retraining: leave-one-out (or leave-group-out) and the linear
datamodeling score (LDS).

Both call a user-supplied ``train_fn(indices) -> model`` that trains a fresh
model on the training examples at ``indices`` (a sorted ``int64`` array), and
``measure(model) -> float`` (or a ``(k,)`` array, several targets at once) that
evaluates the target. ``train_fn`` should be deterministic (seed it inside),
so that differences come from the data and not from the seed.

Sign convention, as for influence scores: a POSITIVE measured change means the
removed examples HELPED (removing them raised the target).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_json
from .._progress import progress_bar
from .metrics import spearman

TrainFn = Callable[[np.ndarray], Any]
MeasureFn = Callable[[Any], Any]


def _measured(value: Any, where: str) -> np.ndarray:
    arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=float).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"measure returned nothing for {where}; it must return a float or a 1-D array")
    if not np.all(np.isfinite(arr)):
        raise FloatingPointError(f"measure returned a non-finite value for {where}: {arr[:5].tolist()}")
    return arr


def loo(
    train_fn: TrainFn,
    measure: MeasureFn,
    n: int,
    *,
    groups: Sequence[Sequence[int]] | None = None,
    baseline: Any = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Actual leave-one-out (or leave-group-out) change of a target, by retraining.

    Args:
        train_fn: ``train_fn(indices) -> model``, trains on those training examples.
        measure: ``measure(model) -> float`` or ``(k,)`` values (several targets).
        n: number of training examples.
        groups: ``None`` removes each example alone (``n`` retrainings); else a
            list of index collections, each removed together.
        baseline: the measured target of the model trained on all ``n``
            examples; default: train it with ``train_fn(arange(n))``.

    Returns:
        ``(n_groups,)`` (or ``(n_groups, k)``) changes ``f(without group) -
        f(all)``, in target units. Positive = the removed examples helped.
        Compare with influence scores: for the Hessian comparators
        ``score_i / n`` predicts it; for the identity the ranking does.
    """
    if n < 2:
        raise ValueError(f"loo needs n >= 2 training examples, got {n}")
    if groups is None:
        groups = [[i] for i in range(n)]
    idx_groups = []
    for j, g in enumerate(groups):
        arr = np.unique(np.asarray(g, dtype=np.int64).reshape(-1))
        if arr.size == 0 or arr.min() < 0 or arr.max() >= n:
            raise ValueError(f"loo: group {j} = {list(g)[:5]} must hold indices in [0, {n})")
        if arr.size >= n:
            raise ValueError(f"loo: group {j} removes all {n} examples")
        idx_groups.append(arr)
    all_idx = np.arange(n, dtype=np.int64)
    base = _measured(measure(train_fn(all_idx)) if baseline is None else baseline, "the full training set")
    out = np.zeros((len(idx_groups), base.size))
    bar = progress_bar(len(idx_groups), "leave-out retraining", progress)
    try:
        for j, g in enumerate(idx_groups):
            value = _measured(measure(train_fn(np.setdiff1d(all_idx, g))), f"group {j}")
            if value.size != base.size:
                raise ValueError(f"measure returned {value.size} values for group {j} but {base.size} for the baseline")
            out[j] = value - base
            bar.update(1)
    finally:
        bar.close()
    return out[:, 0] if base.size == 1 else out


# ---- the linear datamodeling score ----------------------------------------------------


def subset_masks(n: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``(n_subsets, n)`` boolean masks, each keeping exactly ``round(alpha * n)``
    examples drawn uniformly without replacement (``numpy`` generator seeded by ``seed``)."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha (the share of examples kept) must be in (0, 1), got {alpha}")
    if n_subsets < 2:
        raise ValueError(f"n_subsets must be >= 2 to compute a correlation, got {n_subsets}")
    k = int(round(alpha * n))
    if not 0 < k < n:
        raise ValueError(f"alpha={alpha} keeps {k} of {n} examples; choose alpha so that 0 < alpha * n < n")
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n), dtype=bool)
    for j in range(n_subsets):
        masks[j, rng.choice(n, size=k, replace=False)] = True
    return masks


def _masks_digest(masks: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(masks, axis=1).tobytes() + str(masks.shape).encode()).hexdigest()


def retrain_subsets(
    train_fn: TrainFn,
    measure: MeasureFn,
    masks: np.ndarray,
    *,
    results_path: str | Path | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Train on each subset and measure the target: ``(n_subsets, k)`` values.

    With ``results_path`` each finished subset is saved at once (JSON, written
    atomically) together with a digest of the masks; calling again with the
    same masks resumes after the last finished subset, and a file made for
    other masks is refused. ``"complete": true`` marks a finished file. A saved
    file is reused only after subset 0 is retrained and measured again and
    agrees with its saved values (relative 1e-5): a changed ``train_fn`` or
    ``measure`` (or training that is not deterministic) is refused, at the cost
    of one retraining.

    Raises:
        ValueError: masks not 2-d; a results file of other masks, or whose subset
            0 is no longer reproduced; ``measure`` returning another number of values.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2:
        raise ValueError(f"masks must be (n_subsets, n), got shape {masks.shape}")
    digest = _masks_digest(masks)
    done: list[list[float]] = []
    path = Path(results_path) if results_path is not None else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("masks_sha256") != digest:
            raise ValueError(
                f"{path} holds results for other subsets (n={saved.get('n')}, n_subsets={saved.get('n_subsets')}, "
                "or other alpha / seed); delete it or choose another results_path"
            )
        done = [list(map(float, row)) for row in saved["outputs"]]
        if done:  # the same train_fn and measure: subset 0 again, compared with what was saved
            again = _measured(measure(train_fn(np.flatnonzero(masks[0]).astype(np.int64))), "subset 0")
            was = np.asarray(done[0], dtype=float)
            if again.shape != was.shape or not np.allclose(again, was, rtol=1e-5, atol=1e-8 * max(1.0, np.abs(was).max())):
                raise ValueError(f"{path} holds results that subset 0 no longer reproduces (saved {was[:3].tolist()}, "
                                 f"now {again[:3].tolist()}): train_fn or measure changed, or training is not "
                                 "deterministic (seed it); delete the file or choose another results_path")  # fmt: skip
    bar = progress_bar(masks.shape[0], "subset retraining", progress)
    bar.update(len(done))
    meta = {"n": int(masks.shape[1]), "n_subsets": int(masks.shape[0]), "masks_sha256": digest}
    try:
        for j in range(len(done), masks.shape[0]):
            value = _measured(measure(train_fn(np.flatnonzero(masks[j]).astype(np.int64))), f"subset {j}")
            if done and len(done[0]) != value.size:
                raise ValueError(f"measure returned {value.size} values for subset {j} but {len(done[0])} before")
            done.append(value.tolist())
            if path is not None:
                atomic_write_json(path, {**meta, "outputs": done, "complete": len(done) == masks.shape[0]}, indent=None)
            bar.update(1)
    finally:
        bar.close()
    return np.asarray(done, dtype=float)


@dataclass
class LDSResult:
    """The linear datamodeling score.

    Attributes:
        mean: LDS averaged over targets, in [-1, 1] (1 = the summed scores order
            the retrained models exactly as the measured targets do).
        per_target: ``(k,)`` Spearman correlation for each target.
        predicted: ``(n_subsets, k)`` summed scores of the kept examples.
        actual: ``(n_subsets, k)`` measured targets.
    """

    mean: float
    per_target: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray


def lds_score(scores: Any, masks: np.ndarray, outputs: Any) -> LDSResult:
    """LDS of ``scores`` ``(n,)`` or ``(k, n)`` given subset ``masks`` ``(M, n)``
    and measured ``outputs`` ``(M,)`` or ``(M, k)``.

    For each target t: Spearman correlation over subsets between
    ``sum_{i in S_j} scores[t, i]`` and ``-outputs[j, t]`` (the minus: positive
    scores help, i.e. lower the target). Averaged over targets.
    """
    masks = np.asarray(masks, dtype=bool)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    out = np.asarray(outputs, dtype=float)
    out = out[:, None] if out.ndim == 1 else out
    if s.shape[1] != masks.shape[1]:
        raise ValueError(f"scores cover {s.shape[1]} examples but the masks cover {masks.shape[1]}")
    if out.shape[0] != masks.shape[0]:
        raise ValueError(f"{out.shape[0]} measured outputs for {masks.shape[0]} subsets")
    if s.shape[0] != out.shape[1]:
        raise ValueError(f"{s.shape[0]} score vectors for {out.shape[1]} measured targets; they must match")
    predicted = masks.astype(float) @ s.T
    per = np.array([spearman(predicted[:, t], -out[:, t]) for t in range(out.shape[1])])
    return LDSResult(mean=float(per.mean()), per_target=per, predicted=predicted, actual=out)


def lds(
    scores: Any,
    train_fn: TrainFn,
    measure: MeasureFn,
    n: int,
    *,
    n_subsets: int = 50,
    alpha: float = 0.5,
    seed: int = 0,
    results_path: str | Path | None = None,
    progress: bool | None = None,
) -> LDSResult:
    """Linear datamodeling score: retrain on ``n_subsets`` random subsets of a
    share ``alpha`` of the ``n`` training examples (seeded), measure the target
    on each, and correlate with the summed scores (see :func:`lds_score`).
    Resumable through ``results_path`` (see :func:`retrain_subsets`). To compare
    several scoring methods on the same retrainings, call
    :func:`subset_masks` and :func:`retrain_subsets` once and
    :func:`lds_score` for each method.
    """
    masks = subset_masks(n, n_subsets, alpha, seed)
    outputs = retrain_subsets(train_fn, measure, masks, results_path=results_path, progress=progress)
    return lds_score(scores, masks, outputs)
