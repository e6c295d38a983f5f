"""Study: fairness repair on Adult and COMPAS, demographic parity and equal opportunity.

    python benchmarks/fairness.py [--quick] [--out benchmarks/results/fairness]

Logistic regression (SGD lr 0.01, momentum 0.9, batch 256, 30 epochs, weight
decay 1e-3; Adult subsampled to 5,000 training rows) is trained once; the
training data is scored against a DemographicParity / EqualOpportunity target
on the validation half of the test split, the most harmful share is removed
(or reweighted) and the model retrained, for each fraction of the sweep.
The same repair scored by exact influence, ``g_i^T (H + 1e-3 I)^{-1} grad f``
with the explicit Hessian of the mean training loss (``Influence(hessian="exact",
damping=1e-3)``, the damping being the training weight decay), is the
second-order comparator. Random removal of the same share (3 draws, averaged) is the baseline. Gaps are
the hard-prediction gaps on the reported test half.

Writes fairness.json, fairness.md and fairness.png under --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _util import markdown_table, peak_rss_mb, tabular_splits, write_json  # noqa: E402

from hessfree.apps import repair_fairness  # noqa: E402
from hessfree.apps._retrain import fit_model  # noqa: E402
from hessfree.datasets import adult, compas  # noqa: E402

RECIPE = dict(epochs=30, lr=0.01, momentum=0.9, batch_size=256, weight_decay=1e-3)
DAMPING = RECIPE["weight_decay"]
LOADERS = {"adult": lambda: adult(n_train=5000), "compas": compas}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="COMPAS, DP, three fractions, one random draw")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fairness"))
    ap.add_argument("--actions", default="remove,reweight")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = ["compas"] if args.quick else ["adult", "compas"]
    metrics = ["dp"] if args.quick else ["dp", "eo"]
    fractions = (0.02, 0.05, 0.1) if args.quick else (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2)
    random_draws = 1 if args.quick else 3
    actions = ["remove"] if args.quick else args.actions.split(",")
    results = []
    for name in names:
        d = LOADERS[name]()
        tr, va, te, gv, gt = tabular_splits(d)

        def make(d=d):
            return nn.Linear(d.n_features, 1)

        base = fit_model(make, *tr, 0, RECIPE)
        for metric in metrics:
            t0 = time.perf_counter()
            common = dict(metric=metric, fractions=fractions, favourable=d.favourable, train_kwargs=RECIPE, base_model=base)
            for action in actions:
                r = repair_fairness(make, tr, va, gv, te, gt, action=action, progress=False, **common)
                results.append({"data": name, "metric": metric, "method": f"hessfree {action}",
                                **{k: v for k, v in r.to_dict().items() if k != "scores"}})  # fmt: skip
                r = repair_fairness(make, tr, va, gv, te, gt, action=action, progress=False, hessian="exact",
                                    damping=DAMPING, **common)  # fmt: skip
                results.append({"data": name, "metric": metric, "method": f"exact {action}",
                                **{k: v for k, v in r.to_dict().items() if k != "scores"}})  # fmt: skip
            rnd = [repair_fairness(make, tr, va, gv, te, gt, strategy="random", seed=s, **{**common, "base_model": base if s == 0 else None})
                   for s in range(random_draws)]  # fmt: skip
            curve = [
                {"fraction": f, "gap": float(np.mean([r.curve[i].gap for r in rnd])),
                 "accuracy": float(np.mean([r.curve[i].accuracy for r in rnd]))}
                for i, f in enumerate(fractions)
            ]  # fmt: skip
            results.append({"data": name, "metric": metric, "method": "random removal", "gap_before": rnd[0].gap_before,
                            "acc_before": rnd[0].acc_before, "curve": curve})  # fmt: skip
            print(f"{name} {metric}: {time.perf_counter() - t0:.0f}s", flush=True)
            write_json(args.out / "fairness.json", {"results": results, "peak_rss_mb": peak_rss_mb()})
    rows, verdict = [], []
    for r in results:
        for p in r["curve"]:
            rows.append({"data": r["data"], "metric": r["metric"], "method": r["method"], "fraction": p["fraction"],
                         "gap_before": r["gap_before"], "gap": p["gap"], "acc_before": r["acc_before"], "accuracy": p["accuracy"]})  # fmt: skip
    for r in results:
        if r["method"] == "random removal":
            continue
        rnd = next(x for x in results if x["data"] == r["data"] and x["metric"] == r["metric"] and x["method"] == "random removal")
        ok = [p for p in r["curve"] if p["accuracy"] >= r["acc_before"] - 0.01]
        best = min(ok, key=lambda p: p["gap"]) if ok else None
        verdict.append({
            "data": r["data"], "metric": r["metric"], "method": r["method"], "gap_before": r["gap_before"],
            "best_gap_within_1pt": best["gap"] if best else float("nan"),
            "cut": (1 - best["gap"] / r["gap_before"]) if best and r["gap_before"] > 0 else float("nan"),
            "at_fraction": best["fraction"] if best else "",
            "beats_random_at": f"{sum(a['gap'] < b['gap'] for a, b in zip(r['curve'], rnd['curve']))}/{len(r['curve'])}",
        })  # fmt: skip
    md = ["# Fairness repair", "", "Trade-off curve (test half; gap = hard-prediction gap):", ""]
    md.append(markdown_table(rows, ["data", "metric", "method", "fraction", "gap_before", "gap", "acc_before", "accuracy"]))
    md += ["", "Best gap cut for at most 1 point of accuracy, and fractions where the method's curve is below random removal's:", ""]
    md.append(markdown_table(verdict, ["data", "metric", "method", "gap_before", "best_gap_within_1pt", "cut", "at_fraction", "beats_random_at"]))
    (args.out / "fairness.md").write_text("\n".join(md) + "\n")
    write_json(args.out / "fairness.json", {"results": results, "verdict": verdict, "peak_rss_mb": peak_rss_mb()})
    plot(results, args.out / "fairness.png")
    print("\n".join(md))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["data"], r["metric"]) for r in results})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in (r for r in results if (r["data"], r["metric"]) == key):
            ax.plot([0] + [p["fraction"] for p in r["curve"]], [r["gap_before"]] + [p["gap"] for p in r["curve"]], "o-", label=r["method"])
        ax.set_title(f"{key[0]} {key[1].upper()}")
        ax.set_xlabel("fraction of training data")
        ax.set_ylabel("gap")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
