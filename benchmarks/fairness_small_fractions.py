"""Study: why removing the top 1-2% by the equal-opportunity score does not beat
random removal on COMPAS, and what does not change that.

    python benchmarks/fairness_small_fractions.py [--data compas] [--metric eo]
        [--out benchmarks/results/fairness_small_fractions]

Same data, split, model and recipe as benchmarks/fairness.py (logistic regression,
SGD lr 0.01, momentum 0.9, batch 256, 30 epochs, weight decay 1e-3). Parts:

A. Seed-robust comparison: the hessfree removal retrained with 5 seeds (0-4) and
   random removal with 10 draws (draw s retrained with seed s), hard test gap
   averaged, at every fraction of the fairness study.
B. Mechanism: the surrogate the score follows (mean predicted probability of the
   favourable class per group, on the validation half; positives only for "eo")
   and the hard gaps on validation and test, before and after removing 1, 2, 5%.
C. Variants scored differently (each retrained with seeds 0-2, gap averaged):
   a sharper surrogate ``mean sigmoid(logit / tau)`` (tau 0.5, 0.25; tau -> 0 is
   the hard rate), TracIn-CP over the 30 epoch checkpoints, 8 weight-noise
   members (relative sigma 0.1 and 0.3), and a converged recipe (full batch,
   lr 0.5, 300 epochs) for both the scoring model and the retraining.

Writes fairness_small_fractions.json and .md under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _util import markdown_table, tabular_splits, write_json  # noqa: E402
from fairness import LOADERS, RECIPE  # noqa: E402

import hessfree as hf  # noqa: E402
from hessfree.apps._retrain import curate, fit_model  # noqa: E402
from hessfree.apps.fairness import group_gap, predict  # noqa: E402
from hessfree.data import batch_size_of  # noqa: E402
from hessfree.targets import DemographicParity, EqualOpportunity  # noqa: E402
from hessfree.training import accuracy, train  # noqa: E402

FRACTIONS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2)
CONVERGED = dict(epochs=300, lr=0.5, momentum=0.9, batch_size=1 << 16, weight_decay=1e-3)


def sharpened(base: type, tau: float):
    """The probability-form gap target with ``sigmoid(logit / tau)`` in place of the probability."""

    class Sharp(base):
        def sums(self, task, model, batch, offset):
            idx = self.group_index[offset : offset + batch_size_of(batch)]
            value = torch.sigmoid(task.forward(model, batch).reshape(-1) / tau)
            onehot = F.one_hot(idx, len(self.levels)).to(value.dtype)
            if self.restrict_to_favourable:
                y = task.labels(batch).reshape(-1)
                onehot = onehot * (y == self.favourable).to(value.dtype).unsqueeze(1)
            return {"value": onehot.T @ value, "n": onehot.sum(0)}

    return Sharp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="compas", choices=sorted(LOADERS))
    ap.add_argument("--metric", default="eo", choices=["dp", "eo"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fairness_small_fractions"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = LOADERS[args.data]()
    tr, va, te, gv, gt = tabular_splits(d)
    gvn, gtn = np.asarray(gv), np.asarray(gt)

    def make():
        return nn.Linear(d.n_features, 1)

    target_cls = EqualOpportunity if args.metric == "eo" else DemographicParity

    def gap(m, x=te[0], y=te[1], g=gtn):
        return group_gap(predict(m, x), y, g, args.metric, d.favourable)

    def scores_of(model, target, members=None):
        return hf.Influence(hf.ClassificationTask(model), members=members).fit(tr).influence(target)

    torch.manual_seed(0)
    base = make()
    run = train(base, tr, seed=0, checkpoints=True, progress=False, **RECIPE)
    target = target_cls(va, groups=gv, favourable=d.favourable)
    s = scores_of(base, target)

    # A: seed-robust comparison
    part_a, random_mean = [], {}
    before = [gap(fit_model(make, *tr, sd, RECIPE)) for sd in range(5)]
    for f in FRACTIONS:
        kw, _ = curate(s, tr[1], "remove", f, "influence", 0, 2)
        h = [gap(fit_model(make, *tr, sd, RECIPE, **kw)) for sd in range(5)]
        r = []
        for sd in range(10):
            kw_r, _ = curate(None, tr[1], "remove", f, "random", sd, 2)
            r.append(gap(fit_model(make, *tr, sd, RECIPE, **kw_r)))
        random_mean[f] = float(np.mean(r))
        part_a.append({"fraction": f, "gap_before_5_seeds": float(np.mean(before)), "hessfree_5_seeds": float(np.mean(h)),
                       "hessfree_sd": float(np.std(h)), "random_10_draws": random_mean[f], "random_sd": float(np.std(r)),
                       "hessfree_lower": bool(np.mean(h) < random_mean[f])})  # fmt: skip
        print(part_a[-1], flush=True)

    # B: the surrogate against the hard gaps
    def surrogate(m):
        with torch.no_grad():
            p = torch.sigmoid(m(va[0]).reshape(-1)).numpy()
        keep = (va[1].numpy() == d.favourable) if args.metric == "eo" else np.ones(len(p), bool)
        means = [p[keep & (gvn == g)].mean() for g in np.unique(gvn)]
        return float(abs(means[0] - means[1]))

    part_b = [{"fraction": 0.0, "val_surrogate": surrogate(base), "val_gap": gap(base, va[0], va[1], gvn), "test_gap": gap(base)}]
    for f in (0.01, 0.02, 0.05):
        kw, idx = curate(s, tr[1], "remove", f, "influence", 0, 2)
        m = fit_model(make, *tr, 0, RECIPE, **kw)
        part_b.append({"fraction": f, "val_surrogate": surrogate(m), "val_gap": gap(m, va[0], va[1], gvn), "test_gap": gap(m),
                       "removed_with_favourable_label": float((tr[1][idx] == d.favourable).float().mean())})  # fmt: skip
        print(part_b[-1], flush=True)

    # C: variants
    ck = hf.members.Checkpoints(run.checkpoints, run.lrs)
    variants = {
        "default (probability surrogate)": (lambda: s, RECIPE),
        "sharper surrogate, tau 0.5": (lambda: scores_of(base, sharpened(target_cls, 0.5)(va, groups=gv, favourable=d.favourable)), RECIPE),
        "sharper surrogate, tau 0.25": (lambda: scores_of(base, sharpened(target_cls, 0.25)(va, groups=gv, favourable=d.favourable)), RECIPE),
        "TracIn-CP, 30 checkpoints": (lambda: scores_of(base, target, ck), RECIPE),
        "weight noise x8, sigma 0.1": (lambda: scores_of(base, target, hf.members.WeightNoise(8, 0.1, seed=0, relative=True)), RECIPE),
        "weight noise x8, sigma 0.3": (lambda: scores_of(base, target, hf.members.WeightNoise(8, 0.3, seed=0, relative=True)), RECIPE),
    }  # fmt: skip
    conv = fit_model(make, *tr, 0, CONVERGED)
    variants["converged recipe (full batch, 300 epochs)"] = (lambda: scores_of(conv, target), CONVERGED)
    part_c = []
    for name, (score_fn, recipe) in variants.items():
        sc = score_fn()
        row = {"variant": name}
        wins = 0
        for f in FRACTIONS:
            kw, _ = curate(sc, tr[1], "remove", f, "influence", 0, 2)
            ms = [fit_model(make, *tr, sd, recipe, **kw) for sd in range(3)]
            g = float(np.mean([gap(m) for m in ms]))
            row[f"{f:.0%}"] = g
            row[f"acc {f:.0%}"] = float(np.mean([accuracy(m, *te) for m in ms]))
            wins += g < random_mean[f]
        row["below_random_at"] = f"{wins}/{len(FRACTIONS)}"
        part_c.append(row)
        print(row, flush=True)

    md = [f"# {args.data} {args.metric}: small removal fractions", "",
          "A. Hard test gap: hessfree removal (mean of 5 retraining seeds) against random removal (mean of 10 draws):", "",
          markdown_table(part_a, ["fraction", "gap_before_5_seeds", "hessfree_5_seeds", "hessfree_sd", "random_10_draws",
                                  "random_sd", "hessfree_lower"]),
          "", "B. The surrogate the score follows (validation) against the hard gaps (retraining seed 0):", "",
          markdown_table(part_b, ["fraction", "val_surrogate", "val_gap", "test_gap", "removed_with_favourable_label"]),
          "", "C. Scored differently (hard test gap, mean of 3 retraining seeds; `below_random_at`: fractions where it is",
          "below part A's random mean):", "",
          markdown_table(part_c, ["variant", *[f"{f:.0%}" for f in FRACTIONS], "below_random_at"]), ""]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fairness_small_fractions.md").write_text("\n".join(md))
    write_json(args.out / "fairness_small_fractions.json", {"A": part_a, "B": part_b, "C": part_c, "data": args.data, "metric": args.metric})
    print("\n".join(md))


if __name__ == "__main__":
    main()
