"""Can identity-Hessian scores be trusted on this model? One call that says so.

Hessian-free scores ``g_i . grad f`` drop the inverse curvature of the classic
influence function ``g_i^T (H + lambda I)^{-1} grad f`` (Koh and Liang 2017).
That is harmless when the curvature is close to a multiple of the identity on
the directions that matter and wrong when it is ill-conditioned: in
``docs/fidelity.md`` part (a), stretching one feature of a logistic regression
(condition number 1.6 -> 327) drops IP vs leave-one-out from 0.98 to 0.73 while
the exact influence function stays at 0.98, and the angle between ``grad f``
and ``H^{-1} grad f`` grows from 3 to 81 degrees.

:func:`trust` computes both kinds of scores for the user's target and reports

* the Spearman rank correlation between identity and curvature-corrected scores,
* the overlap of their top-k most helpful and most harmful examples,
* the angle between ``grad f`` and its preconditioned version (per member; the largest is used),
* with ``train_fn``: a spot check against retraining (leave-group-out, or the
  linear datamodeling score of Park et al. 2023, "TRAK";
  :func:`hessfree.metrics.loo` / :func:`hessfree.metrics.lds_score`) for both,

and a verdict. Without retraining the identity is called adequate when the
rank correlation is at least ``min_spearman`` (0.9) and the angle at most
``max_angle`` (20 degrees). The thresholds come from part (a): the
well-conditioned case gives 0.99 and 3 degrees against the exact Hessian (0.97
and 9 degrees against the empirical Fisher with its default damping), the
ill-conditioned one 0.73 and 81 degrees (exact Hessian) or 0.997 and 36
degrees (empirical Fisher, default damping: the damping, a tenth of the mean
eigenvalue, hides most of the stretch; at ``damping_ratio=0.001`` 0.74 and 82
degrees). With retraining the measured numbers decide: the curvature is
recommended when it agrees with retraining better than the identity by more
than ``margin`` (0.05); otherwise the identity is adequate if the two agree
by the thresholds above and, for the leave-group-out check, the identity's rank
correlation with the retrained changes is at least ``min_spearman`` too. When
they disagree, or the identity misses that correlation, and retraining favours
neither, the verdict says so ("identity is not reliable here") and suggests a
smaller damping: a heavily damped curvature agrees with the identity and hides
what retraining shows (part (a), stretched, ``damping_ratio=1``: rank
correlation 0.9999, angle 4.6 degrees, both 0.69 against leave-one-out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import integer
from .._io import atomic_write_json
from ..hessian import target_directions
from ..influence import Influence
from ..metrics import cosine, lds_score, loo, retrain_subsets, spearman, subset_masks
from ..targets import Target, Utility
from ..task import Task
from ._sample import size_of

SPOT_CHECKS = ("groups", "lds")
RESULT_FILE = "trust.json"


@dataclass
class TrustReport:
    """What :func:`trust` measured, and its verdict.

    Attributes:
        verdict: ``"identity is adequate here"``, ``"use hessian='<name>'"``, or (retraining
            favours neither while the two disagree) ``"identity is not reliable here, ..."``.
        adequate: whether identity scores are adequate.
        reasons: the numbers behind the verdict, one sentence each.
        hessian: the curvature the identity was compared with (``"fisher"``, ``"exact"``, ...).
        n_train: training examples scored.
        spearman: rank correlation of identity with curvature-corrected scores, in [-1, 1].
        top_k: size of the compared top sets; ``overlap_helpful`` / ``overlap_harmful``:
            share of the curvature-corrected top-k (highest / lowest scores) also in the identity's, in [0, 1].
        angle_deg: largest angle over members between ``grad f`` and its
            preconditioned version, degrees; ``angles_deg``: per member.
        condition_number: of the damped curvature, when the comparator reports it (largest over members).
        damping: the damping used (the comparator's report, e.g. the default rule of ``"fisher"``).
        ground_truth: with ``train_fn``: ``{"kind", "n_retrainings", "identity", "hessian"}``,
            the Spearman correlation of each method's predictions with the measured changes.
        seconds: wall time of each step.
        scores_identity, scores_hessian: ``(n_train,)`` scores (positive = helps the target).
    """

    verdict: str
    adequate: bool
    reasons: list[str]
    hessian: str
    n_train: int
    spearman: float
    top_k: int
    overlap_helpful: float
    overlap_harmful: float
    angle_deg: float
    angles_deg: list[float]
    condition_number: float | None
    damping: float | None
    ground_truth: dict | None
    seconds: dict
    scores_identity: np.ndarray = field(default=None, repr=False)
    scores_hessian: np.ndarray = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-friendly content (without the score vectors)."""
        out = asdict(self)
        out.pop("scores_identity")
        out.pop("scores_hessian")
        return out

    def __str__(self) -> str:
        lines = [f"Trust: identity vs hessian={self.hessian!r} on {self.n_train} training examples",
                 f"  Spearman {self.spearman:.3f}; top-{self.top_k} overlap helpful {self.overlap_helpful:.2f}, "
                 f"harmful {self.overlap_harmful:.2f}; angle grad f vs preconditioned {self.angle_deg:.1f} deg"]
        if self.condition_number is not None:
            lines.append(f"  condition number of the damped curvature {self.condition_number:.3g}"
                         + (f" (damping {self.damping:.3g})" if self.damping is not None else ""))
        if self.ground_truth:
            gt = self.ground_truth
            lines.append(f"  vs retraining ({gt['kind']}, {gt['n_retrainings']} retrainings): identity "
                         f"{gt['identity']:.3f}, hessian={self.hessian!r} {gt['hessian']:.3f} (Spearman)")
        lines += [f"  - {r}" for r in self.reasons]
        lines.append(f"Verdict: {self.verdict}")
        return "\n".join(lines)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(cosine(a, b))))


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of ``b``'s top-``k`` found in ``a``'s top-``k``."""
    return len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k


def _hessian_name(hessian: Any) -> str:
    return hessian if isinstance(hessian, str) else getattr(hessian, "name", type(hessian).__name__)


def _spot_check(kind, scores, train_fn, measure, n, n_groups, group_size, n_subsets, seed, progress) -> dict:
    """Spearman of each method's predictions with retraining (``scores``: name -> ``(n,)``)."""
    if kind == "groups":
        size = group_size or max(1, n // 100)
        order = np.random.default_rng(seed).permutation(n)
        groups = [order[j * size:(j + 1) * size] for j in range(min(n_groups, n // size))]
        actual = loo(train_fn, measure, n, groups=groups, progress=progress)
        out = {name: spearman([s[g].sum() for g in groups], actual) for name, s in scores.items()}
        return {"kind": f"leave-group-out ({len(groups)} groups of {size})", "n_retrainings": len(groups) + 1, **out}
    masks = subset_masks(n, n_subsets, 0.5, seed)
    outputs = retrain_subsets(train_fn, measure, masks, progress=progress)
    out = {name: lds_score(s, masks, outputs).mean for name, s in scores.items()}
    return {"kind": f"LDS ({n_subsets} subsets of half the data)", "n_retrainings": n_subsets, **out}


def trust(
    task: Task | Influence,
    train: Any,
    target: Target | Any,
    *,
    hessian: Any = "fisher",
    damping: float | None = None,
    hessian_options: dict | None = None,
    projection: Any = None,
    members: Any = None,
    params: Any = None,
    train_fn: Callable[[np.ndarray], Any] | None = None,
    spot_check: str = "groups",
    n_groups: int = 30,
    group_size: int | None = None,
    n_subsets: int = 20,
    top_k: int | None = None,
    min_spearman: float = 0.9,
    max_angle: float = 20.0,
    margin: float = 0.05,
    seed: int = 0,
    engine: str = "auto",
    batch_size: int = 256,
    progress: bool | None = False,
    save_to: str | Path | None = None,
) -> TrustReport:
    """Compare identity-Hessian scores with curvature-corrected ones on ``target``.

    Args:
        task: the :class:`hessfree.Task`, or a configured identity :class:`hessfree.Influence`
            (its task, members, params, projection and engine are used, the user's object is not
            changed). With a ``store=`` (and no ``members`` / ``params`` / ``projection`` given here)
            that store is reopened: ``train`` is checked against it (``StoreMismatchError``) and no
            training gradient is computed again; with ``hessian="fisher"`` the curvature comes from the
            same store. Without a store the identity scores are computed from ``train`` (a fitted
            estimator's features could not be told apart from those of other data of the same size).
        train: the training data (anything ``Influence.fit`` accepts).
        target: an :mod:`hessfree.targets` target, or held-out data (then ``Utility(data)``: mean loss).
        hessian, damping, hessian_options: the curvature to compare with, as for ``hf.Influence``
            (``"fisher"``: the damped empirical Fisher of the stored features, the curvature of
            TRAK; ``"exact"``, ``"cg"``, ...).
        projection, members, params: as for ``hf.Influence`` (the same for both estimators; given with an
            estimator, they replace its own for both).
        train_fn: ``train_fn(indices) -> model`` trains a fresh model on those
            examples, as the model was trained (seeded). With it, a spot check against retraining:
            ``spot_check="groups"`` removes ``n_groups`` random groups of ``group_size``
            (default ``max(1, n // 100)``) examples, ``"lds"`` retrains on ``n_subsets`` halves.
        top_k: size of the compared top sets (default ``max(5, min(100, n // 20))``).
        min_spearman, max_angle, margin: the verdict's thresholds (see the module docstring).
        save_to: a folder (e.g. the estimator's ``store``): writes ``trust.json`` (``to_dict()``) there.

    Returns:
        :class:`TrustReport` (``print`` it, or ``to_dict()`` for JSON).

    Raises:
        ValueError: an unknown ``spot_check``, thresholds out of range, or a
            ``hessian`` that cannot be combined with ``projection`` (raised by ``hf.Influence``).
    """
    if spot_check not in SPOT_CHECKS:
        raise ValueError(f"spot_check must be one of {SPOT_CHECKS}, got {spot_check!r}")
    if not -1 <= min_spearman <= 1 or not 0 <= max_angle <= 180:
        raise ValueError(f"min_spearman must be in [-1, 1] and max_angle in [0, 180]; got {min_spearman}, {max_angle}")
    note = " (a rank correlation over fewer means little)"
    n_groups, n_subsets = integer(n_groups, "n_groups", 5, note=note), integer(n_subsets, "n_subsets", 5, note=note)
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    n = size_of(train, "train")
    if top_k is not None:
        top_k = integer(top_k, "top_k", 1, n, note=" (the training examples), or None")
    if group_size is not None:
        group_size = integer(group_size, "group_size", 1, n // 2, note=f" (half of the {n} training examples), or None")
    seed = integer(seed, "seed", 0)
    if save_to is not None and Path(save_to).exists() and not Path(save_to).is_dir():
        raise ValueError(f"save_to={str(save_to)!r} is a file; give a folder (trust.json is written in it)")
    if isinstance(hessian, str) and hessian == "identity":
        raise ValueError("hessian='identity' compares the identity with itself; choose 'fisher', 'exact' or 'cg'")
    shared = {}
    if isinstance(task, Influence):
        given = task
        if given.hessian is not None:
            raise ValueError(f"trust() compares identity scores with hessian={hessian!r}, but the estimator given "
                             f"has {given.hessian!r}; pass one made with hessian='identity' (the default)")
        a = given.arguments
        if a.store is not None and members is None and params is None and projection is None:
            # reopen its store: the training data is checked against it and no gradient is computed again
            shared = {"store": a.store, "store_dtype": a.store_dtype, "train_map": a.train_map, "device": a.device}
        task, members, params = given.task, given.members if members is None else members, given.params if params is None else params
        projection, engine, batch_size = given.projection if projection is None else projection, given.engine, given.batch_size
    if not isinstance(target, Target):
        target = Utility(target)
    seconds = {}

    def estimator(**kw):
        return Influence(task, members, params, projection=projection, engine=engine, batch_size=batch_size,
                         progress=progress, **kw)  # fmt: skip

    start = time.perf_counter()
    # a transform of the stored features ("fisher") opens the same store instead of computing and holding the
    # training features a second time (the store's arguments.json check refuses a mismatch)
    reuse = shared if _features_space(hessian, damping, hessian_options) else {}
    curv = estimator(hessian=hessian, damping=damping, hessian_options=hessian_options, **reuse)
    s_id = estimator(**shared).fit(train).influence(target)
    seconds["identity"] = time.perf_counter() - start
    start = time.perf_counter()
    s_c = curv.fit(train).influence(target)
    directions = target_directions(curv, target)
    seconds["hessian"] = time.perf_counter() - start

    name = _hessian_name(hessian)
    k = top_k if top_k is not None else min(n, max(5, min(100, n // 20)))
    angles = [_angle(g, q) for g, q in directions]
    conds = [r.get("condition_number") or r.get("condition_number_bound") for r in curv.hessian_report_.values()]
    conds = [c for c in conds if c is not None]
    dampings = [r["damping"] for r in curv.hessian_report_.values() if r.get("damping") is not None]
    report = dict(hessian=name, n_train=n, spearman=spearman(s_id, s_c), top_k=k,
                  overlap_helpful=_overlap(s_id, s_c, k), overlap_harmful=_overlap(-s_id, -s_c, k),
                  angle_deg=max(angles), angles_deg=angles, condition_number=max(conds) if conds else None,
                  damping=max(dampings) if dampings else damping,
                  ground_truth=None, seconds=seconds, scores_identity=s_id, scores_hessian=s_c)  # fmt: skip

    if train_fn is not None:
        start = time.perf_counter()
        user_fn = train_fn

        def train_fn(idx):  # noqa: F811  (the user's, checked)
            model = user_fn(idx)
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"train_fn must return the trained model (a torch.nn.Module), got {type(model).__name__}")
            return model

        def measure(model):
            return target.evaluate(task, model)

        report["ground_truth"] = _spot_check(spot_check, {"identity": s_id, "hessian": s_c}, train_fn, measure, n,
                                             n_groups, group_size, n_subsets, seed, progress)  # fmt: skip
        seconds["retraining"] = time.perf_counter() - start
    adequate, reasons = _verdict(report, min_spearman, max_angle, margin)
    gt = report["ground_truth"]
    if adequate:
        verdict = "identity is adequate here"
    elif gt is not None and gt["hessian"] - gt["identity"] <= margin:
        cond = report["condition_number"]
        if cond is not None and cond > 1e6:  # the inverse amplifies poorly estimated directions a millionfold
            advice = f"its condition number is {cond:.2g}: try a larger damping"
        else:  # a damping that hides most of the curvature (the usual case: part (a) of docs/fidelity.md)
            advice = "try a smaller damping"
        verdict = (f"identity is not reliable here, and hessian={name!r} does not agree with retraining better; "
                   f"{advice} (damping=, or damping_ratio= in hessian_options for 'fisher')")
    elif gt is None:
        verdict = (f"use hessian={name!r}; the two disagree, and without train_fn= nothing measured which one "
                   "agrees with retraining (on the MNIST models of docs/fidelity.md part (d) it was the Fisher)")
    else:
        verdict = f"use hessian={name!r}"
    result = TrustReport(verdict=verdict, adequate=adequate, reasons=reasons, **report)
    if save_to is not None:
        Path(save_to).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(save_to) / RESULT_FILE, result.to_dict())
    return result


def _features_space(hessian: Any, damping: float | None, options: dict | None) -> bool:
    """Whether ``hessian`` transforms the (stored) features, as ``"fisher"`` does, rather than parameter space."""
    from ..hessian import make_inverse_hessian

    return getattr(make_inverse_hessian(hessian, damping, options), "space", None) == "features"


def _verdict(r: dict, min_spearman: float, max_angle: float, margin: float) -> tuple[bool, list[str]]:
    name = r["hessian"]
    agree = r["spearman"] >= min_spearman
    aligned = r["angle_deg"] <= max_angle
    reasons = [
        f"rank correlation with hessian={name!r} {r['spearman']:.3f} "
        + (f">= {min_spearman}" if agree else f"< {min_spearman}: the two rank examples differently"),
        f"angle {r['angle_deg']:.1f} deg "
        + (f"<= {max_angle}" if aligned else f"> {max_angle}: the curvature turns grad f far from itself"),
    ]
    gt = r["ground_truth"]
    if gt is None:
        if not (agree and aligned):
            reasons.append("this says the two disagree, not which one agrees with retraining: pass train_fn= "
                           "for a leave-group-out spot check")
        return agree and aligned, reasons
    gap = gt["hessian"] - gt["identity"]
    reasons.append(f"against retraining hessian={name!r} is {gap:+.3f} from the identity "
                   + (f"(more than {margin} better)" if gap > margin else f"(not more than {margin} better)"))
    # leave-group-out gives a rank correlation with the measured changes, on the scale of min_spearman (an LDS
    # has no such absolute scale: there only the comparison counts)
    close = not gt["kind"].startswith("leave-group-out") or gt["identity"] >= min_spearman
    if not close:
        reasons.append(f"the identity's rank correlation with the retrained changes is {gt['identity']:.3f} "
                       f"< {min_spearman}")
    return gap <= margin and agree and aligned and close, reasons
