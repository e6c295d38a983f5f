"""Bodies of the ``noisy-labels``, ``defend`` and ``fairness`` commands (cli.py parses and checks the flags).

Each run checks its data and every flag combination before any training,
prints its result as tables (rich), and writes one JSON file that records the
arguments, the label (and group) mapping and the numbers printed, plus a PNG
when matplotlib is installed (the ``plots`` extra; without it the run says so
and goes on).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attacks import PGD, LinearMinimal
from ..datasets import flip_labels
from ..errors import DataError
from ..members import Checkpoints
from ..metrics import average_precision, recall_at_k, roc_auc
from ..task import ClassificationTask
from ..training import train
from . import cli_report as R
from . import commands as C
from ._retrain import fit_model
from .defense import defend
from .fairness import repair_fairness
from .noisy_labels import find_noisy_labels

TRAIN_RECIPE = {"lr": 0.1, "momentum": 0.9, "batch_size": 128}


# ---- noisy labels ---------------------------------------------------------------------------------


@dataclass
class RowScores:
    """Suspicion of every row (positions ``0..n-1`` of the data passed), most suspicious NOT first.

    Attributes:
        score, uncertainty, suggested, predicted: ``(n,)`` in position order
            (suggested / predicted are class codes).
        method: the scoring method used.
        scheme: how the rows were scored, in words.
        accuracy: agreement of the models' predictions with the given labels
            (cross-fitting: each row predicted by the model that did not train on it).
        notes: anything the user should know (small classes and the like).
        estimator: the options of the :class:`hessfree.Influence` behind the scores
            (``InfluenceArguments.to_dict()``, the same for every fold), or ``None``.
    """

    score: np.ndarray
    uncertainty: np.ndarray
    suggested: np.ndarray
    predicted: np.ndarray
    method: str
    scheme: str
    accuracy: float
    notes: list[str] = field(default_factory=list)
    estimator: dict | None = None


def _train_with_checkpoints(arch: str, x: torch.Tensor, y: torch.Tensor, k: int, epochs: int, seed: int, progress: bool):
    torch.manual_seed(seed)
    model = C.make_model_factory(arch, x.shape[1], k)()
    res = train(model, (x, y), epochs=epochs, seed=seed, checkpoints=True, progress=progress, **TRAIN_RECIPE)
    return model, Checkpoints(res.checkpoints, res.lrs)


def score_rows(x: np.ndarray, y: np.ndarray, k: int, *, arch: str = "mlp", epochs: int = 10, seed: int = 0,
               folds: int = 5, method: str = "auto", suggest: str = "members", progress: bool = False) -> RowScores:  # fmt: skip
    """Score every row for how likely its label is wrong.

    ``folds >= 2``: cross-fitting. The rows are split into ``folds`` parts
    (stratified by the given label, seeded); for each part a model is trained
    on the other parts with a checkpoint per epoch, and the part's rows are
    scored with :func:`hessfree.apps.find_noisy_labels` at those checkpoints,
    so no row is scored by a model that trained on it. ``folds=1``: one model
    trained on every row scores every row (in-sample self-influence).
    """
    from sklearn.model_selection import StratifiedKFold

    n = len(y)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    score, unc = np.zeros(n), np.zeros(n)
    suggested, predicted = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    notes: list[str] = []
    if folds <= 1:
        model, ckpts = _train_with_checkpoints(arch, xt, yt, k, epochs, seed, progress)
        rep = find_noisy_labels(ClassificationTask(model), (xt, yt), None, members=ckpts, method=method, suggest=suggest,
                                n_classes=k, progress=progress)  # fmt: skip
        score[rep.index], unc[rep.index] = rep.score, rep.uncertainty
        suggested[rep.index], predicted[rep.index] = rep.suggested_label, rep.predicted_label
        scheme = "one model trained on every row (in-sample self-influence over its epoch checkpoints)"
        used = rep.method
    else:
        counts = np.bincount(y, minlength=k)
        small = [c for c in range(k) if 0 < counts[c] < folds]
        if small:
            notes.append(
                f"{len(small)} classes have fewer rows than --folds {folds} (codes {small[:10]}): a model that never "
                "saw such a class cannot suggest it"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            parts = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y))
        used = method
        for f, (tr, te) in enumerate(tqdm(parts, desc="folds", disable=not progress, leave=False)):
            model, ckpts = _train_with_checkpoints(arch, xt[tr], yt[tr], k, epochs, seed + f, progress)
            rep = find_noisy_labels(ClassificationTask(model), (xt[te], yt[te]), None, members=ckpts, method=method,
                                    suggest=suggest, n_classes=k, progress=progress)  # fmt: skip
            rows = te[rep.index]
            score[rows], unc[rows] = rep.score, rep.uncertainty
            suggested[rows], predicted[rows] = rep.suggested_label, rep.predicted_label
            used = rep.method
        scheme = (
            f"{folds}-fold cross-fitting: each row scored (self-influence over the epoch checkpoints) by a model "
            "trained on the other folds, never on the row itself"
        )
    return RowScores(score, unc, suggested, predicted, used, scheme, float(np.mean(predicted == y)), notes, rep.estimator)


def _record(i: int, rows: np.ndarray, labels: C.Labels, y: np.ndarray, s: RowScores) -> dict[str, Any]:
    return {
        "row": int(rows[i]), "given_label": labels.name(y[i]), "suggested_label": labels.name(s.suggested[i]),
        "predicted_label": labels.name(s.predicted[i]), "score": float(s.score[i]), "uncertainty": float(s.uncertainty[i]),
        "suggested_equals_given": bool(s.suggested[i] == y[i]),
    }  # fmt: skip


def run_noisy_labels(args: dict[str, Any]) -> dict:
    a = args
    C.check_source(a["data"], a["csv"], a["label"], None, a["features"], a["n_train"], "noisy-labels")
    out = C.prepare_out(a["out"])
    table, used = C.load_table(a["data"], a["csv"], a["label"], a["features"], a["seed"], a["n_train"])
    n, k = len(used), len(table.labels.classes)
    if a["folds"] > n:
        raise C.CommandError(f"--folds {a['folds']} is more than the {n} rows; use 2 <= --folds <= {n} (or 1: no cross-fitting)")
    x = table.standardised(used)[used]
    y = table.y[used].copy()
    rows = table.rows[used]
    flipped = None
    if a["noise"] > 0:
        m = int(round(a["noise"] * n))
        if m < 1:
            raise C.CommandError(f"--noise {a['noise']:g} flips no row of {n} (round({a['noise']:g} x {n}) = 0); use --noise >= {0.5 / n:.2g}")
        y, flipped = flip_labels(y, a["noise"], n_classes=k, seed=a["seed"])
    plt = R.plots_or_note("noisy_labels.png")
    t0 = time.perf_counter()
    s = score_rows(x, y, k, arch=a["model"], epochs=a["epochs"], seed=a["seed"], folds=a["folds"], method=a["method"],
                   suggest=a["suggest"], progress=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    order = np.argsort(-s.score, kind="stable")
    share = float(np.mean(s.suggested != y))
    top = a["top"]
    n_flag = int(round((share if top is None else top) * n))
    cutoff = float(s.score[order[n_flag - 1]]) if n_flag else None
    records = [_record(i, rows, table.labels, y, s) for i in order]
    payload: dict[str, Any] = {
        "command": "noisy-labels", "args": _jsonable(a), "data": table.name, "row_numbering": table.row_meaning,
        "row_short": table.row_short,
        "labels": table.labels.to_dict(), "n_rows_scored": n, "n_rows_in_source": len(table),
        "scheme": s.scheme, "method": s.method, "model": a["model"], "epochs": a["epochs"],
        "score_meaning": "suspicion: higher = more likely mislabelled (see docs/applications.md)",
        "uncertainty_meaning": "standard deviation over the epoch checkpoints of the row's percentile rank, in [0, 0.5]",
        "agreement_with_given_labels": s.accuracy, "estimated_noise_share": share,
        "flag_rule": f"--top {top:g}" if top is not None else "as many as the estimated share of wrong labels",
        "n_flagged": n_flag, "cutoff_score": cutoff, "seconds_scoring": seconds, "notes": s.notes,
        "estimator": s.estimator,
        "flagged": records[:n_flag],
        "table": {key: [r[key] for r in records] for key in records[0]} if records else {},
    }  # fmt: skip
    if flipped is not None:
        sc = s.score
        payload["detection"] = {
            "noise": a["noise"], "flipped_rows": rows[flipped].tolist(),
            "roc_auc": roc_auc(sc, flipped), "average_precision": average_precision(sc, flipped),
            "recall_top10": recall_at_k(sc, flipped, fraction=0.1), "recall_top20": recall_at_k(sc, flipped, fraction=0.2),
            "suggestion_restores_label_on_flips": float(np.mean(s.suggested[flipped] == table.y[used][flipped])),
        }  # fmt: skip
    path = C.write_json(out, "noisy_labels.json", payload)
    png = None
    if plt is not None:
        png = R.noisy_histogram(plt, out, s.score, flipped, cutoff, n_flag, s.method)
    R.print_noisy(payload, records, a["show"], path, png)
    return payload


# ---- defence --------------------------------------------------------------------------------------


def _acted_fraction_check(fraction: float, n: int, flag: str) -> None:
    if int(round(fraction * n)) < 1:
        raise C.CommandError(
            f"{flag} {fraction:g} acts on no row of the {n} training rows (round({fraction:g} x {n}) = 0); "
            f"use {flag} >= {0.5 / n:.2g}"
        )


def make_attack(arch: str, eps: float | None, overshoot: float | None):
    """The attack of ``defend``: LinearMinimal for ``lr``, PGD (L-inf, 10 steps) for ``mlp``."""
    if arch == "lr":
        if eps is not None:
            raise C.CommandError(f"--eps {eps:g} sets the PGD attack of --model mlp; with --model lr the attack is "
                                 "LinearMinimal: set its strength with --overshoot")  # fmt: skip
        o = 0.3 if overshoot is None else overshoot
        return LinearMinimal(overshoot=o), (
            f"LinearMinimal, overshoot {o:g}: each test point is moved along the weight vector just across the "
            f"original model's decision boundary and {o:.0%} beyond it"
        )
    if overshoot is not None:
        raise C.CommandError(f"--overshoot {overshoot:g} sets the LinearMinimal attack of --model lr; with --model mlp "
                             "the attack is PGD: set its strength with --eps")  # fmt: skip
    e = 0.25 if eps is None else eps
    return PGD(eps=e, steps=10), f"PGD, L-inf radius eps {e:g} in standardised feature units, 10 steps"


def run_defend(args: dict[str, Any]) -> dict:
    a = args
    C.check_source(a["data"], a["csv"], a["label"], None, a["features"], a["n_train"], "defend")
    if a["model"] == "lr" and a["eps"] is not None or a["model"] == "mlp" and a["overshoot"] is not None:
        make_attack(a["model"], a["eps"], a["overshoot"])  # raises, naming the flag
    out = C.prepare_out(a["out"])
    split = C.load_split(a["data"], a["csv"], a["label"], None, a["features"], a["seed"], a["n_train"])
    k = len(split.table.labels.classes)
    if k != 2 and a["model"] == "lr":
        raise C.CommandError(
            f"--model lr uses the binary LinearMinimal attack but --label has {k} classes; use --model mlp (PGD)"
        )
    _acted_fraction_check(a["fraction"], len(split.y), "--fraction")
    attack, attack_words = make_attack(a["model"], a["eps"], a["overshoot"])
    plt = R.plots_or_note("defend.png")
    make = C.make_model_factory(a["model"], split.x.shape[1], k)
    tk = {"epochs": a["epochs"], "lr": 0.05, "momentum": 0.9, "batch_size": 128, "progress": True}
    base = fit_model(make, *split.tensors("train"), a["seed"], tk)
    # every retraining shows its own epoch bar under the outer one
    runs = []
    for draw in tqdm(range(a["draws"]), desc="attack draws", leave=False):
        for strategy in ("influence", "random"):
            r = defend(
                make, split.tensors("train"), split.tensors("val"), split.tensors("test"), action=a["action"],
                fraction=a["fraction"], attack=attack, attack_seed=draw, strategy=strategy, seed=a["seed"],
                train_kwargs=tk, base_model=base, progress=True,
            )  # fmt: skip
            d = r.to_dict()
            d["rows_acted_on"] = split.rows[np.asarray(r.indices, dtype=np.int64)].tolist()
            del d["indices"]
            runs.append(d)
    keys = ("clean_acc_before", "clean_acc_after", "attacked_acc_before", "attacked_acc_after")
    summary = {
        s: {key: float(np.mean([r[key] for r in runs if r["strategy"] == s])) for key in keys} for s in ("influence", "random")
    }
    payload = {
        "command": "defend", "args": _jsonable(a), "data": split.name, "row_numbering": split.table.row_meaning,
        "labels": split.table.labels.to_dict(), "sizes": split.sizes(), "attack": attack_words,
        "accuracy_units": "share of the test rows classified correctly, in [0, 1]",
        "mean_over_draws": summary, "runs": runs, "split_rows": split.row_numbers(),
    }  # fmt: skip
    path = C.write_json(out, "defend.json", payload)
    png = R.defend_plot(plt, out, split.name, a, summary) if plt is not None else None
    R.print_defend(payload, a, path, png)
    return payload


# ---- fairness -------------------------------------------------------------------------------------


def _favourable(split: C.Split, given: str | None) -> tuple[int, str]:
    labels = split.table.labels
    if given is not None:
        return labels.code_of(given, "--favourable"), "--favourable"
    if split.table.favourable is not None:
        return split.table.favourable, f"the built-in {split.name}'s favourable label"
    if [str(c) for c in labels.classes] in (["0", "1"], ["0.0", "1.0"], ["False", "True"]):
        return 1, "the default for 0/1 labels"
    raise C.CommandError(
        f"--favourable is needed: --label {labels.column!r} has classes {', '.join(repr(str(c)) for c in labels.classes)} "
        f"and none is 1; pass the favourable outcome, for example --favourable {str(labels.classes[-1])!r}"
    )


def _check_groups(split: C.Split, metric: str, fav: int) -> None:
    groups = split.table.groups
    n_groups = len(groups.classes)
    if n_groups < 2:
        raise DataError(f"--group {groups.column!r} has one value ({groups.classes[0]!r}); a group gap needs two or more")
    for part, g, y in (("validation", split.gv, split.yv), ("test", split.gt, split.yt)):
        for code in range(n_groups):
            sel = g == code
            if metric == "eo":
                sel = sel & (y == fav)
            if not sel.any():
                extra = " with the favourable label" if metric == "eo" else ""
                raise DataError(
                    f"group {groups.classes[code]!r} of {groups.column!r} has no rows{extra} in the {part} split "
                    f"({len(y)} rows, 20% of the data, seeded by --seed): the gap cannot be measured; add rows of that "
                    "group or try another --seed"
                )


def run_fairness(args: dict[str, Any]) -> dict:
    a = args
    C.check_source(a["data"], a["csv"], a["label"], a["group"], a["features"], a["n_train"], "fairness")
    if a["csv"] is not None and a["group"] is None:
        raise C.CommandError("fairness with --csv needs --group COLUMN (the sensitive attribute)")
    if a["data"] is not None and a["data"] not in C.BUILTIN_GROUPS:
        raise C.CommandError(
            f"--data {a['data']!r} has no groups; fairness needs one of {', '.join(C.BUILTIN_GROUPS)} or --csv with --group"
        )
    fractions = a["fractions"]
    out = C.prepare_out(a["out"])
    split = C.load_split(a["data"], a["csv"], a["label"], a["group"], a["features"], a["seed"], a["n_train"])
    labels = split.table.labels
    if len(labels.classes) != 2:
        raise DataError(
            f"fairness needs a binary label; {labels.column!r} has {len(labels.classes)} classes: "
            f"{', '.join(repr(str(c)) for c in labels.classes[:10])}"
        )
    fav, fav_source = _favourable(split, a["favourable"])
    _check_groups(split, a["metric"], fav)
    for f in fractions:
        _acted_fraction_check(f, len(split.y), "--fractions")
    plt = R.plots_or_note("fairness.png")
    make = C.make_model_factory(a["model"], split.x.shape[1], 2)
    tk = {"epochs": a["epochs"], "lr": 0.05, "momentum": 0.9, "batch_size": 128, "progress": True}
    base = fit_model(make, *split.tensors("train"), a["seed"], tk)
    # every retraining shows its own epoch bar under the outer one
    results = {}
    for strategy in tqdm(("influence", "random"), desc="strategies", leave=False):
        results[strategy] = repair_fairness(
            make, split.tensors("train"), split.tensors("val"), split.gv, split.tensors("test"), split.gt,
            metric=a["metric"], action=a["action"], fractions=fractions, favourable=fav, strategy=strategy,
            seed=a["seed"], train_kwargs=tk, base_model=base, progress=True,
        )  # fmt: skip
    inf, rnd = results["influence"], results["random"]
    best = inf.best()
    payload = {
        "command": "fairness", "args": _jsonable(a), "data": split.name, "row_numbering": split.table.row_meaning,
        "labels": {**labels.to_dict(), "favourable": labels.name(fav), "favourable_code": fav, "favourable_from": fav_source},
        "groups": split.table.groups.to_dict(), "sizes": split.sizes(), "metric": a["metric"], "action": a["action"],
        "gap_units": "difference of rates between groups, in [0, 1]", "accuracy_units": "share of test rows, in [0, 1]",
        "gap_before": inf.gap_before, "acc_before": inf.acc_before,
        "best_within_1_point": None if best is None else {
            "fraction": best.fraction, "gap": best.gap, "accuracy": best.accuracy,
            "random_at_same_fraction": next({"gap": q.gap, "accuracy": q.accuracy} for q in rnd.curve if q.fraction == best.fraction),
        },
    }  # fmt: skip
    payload.update({k: {kk: vv for kk, vv in v.to_dict().items() if kk != "scores"} for k, v in results.items()})
    payload["split_rows"] = split.row_numbers()
    path = C.write_json(out, "fairness.json", payload)
    png = R.fairness_plot(plt, out, results, a["metric"]) if plt is not None else None
    R.print_fairness(payload, fractions, path, png)
    return payload


def _jsonable(a: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in a.items()}


__all__ = ["RowScores", "make_attack", "run_defend", "run_fairness", "run_noisy_labels", "score_rows"]
