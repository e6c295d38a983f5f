"""Study: the seed paper's defence on Adult, COMPAS and German credit.

    python benchmarks/defense.py [--quick] [--out benchmarks/results/defense]

For each data set and model (logistic regression with the LinearMinimal
attack; an MLP d-32-1 with PGD, L-inf eps 0.25, 10 steps) the model is
trained once (SGD lr 0.01, momentum 0.9, batch 256, 30 epochs, weight decay
1e-3; Adult subsampled to 5,000 training rows). Then, for each attack draw
(a seeded half of the validation split is attacked and used as the target),
5% of the training data is removed / relabelled / reweighted by hessfree's
score, or removed at random, and the model is retrained with the same recipe
and seed. Validation = half of the test split; the other half is reported.

Exact influence (logistic regression only): the same defence with the score
``g_i^T (H + 1e-3 I)^{-1} grad f`` from the explicit Hessian of the mean training
loss (``Influence(hessian="exact", damping=1e-3)``; the damping is the training
weight decay, so ``H + 1e-3 I`` is the Hessian of the objective that was trained).

Accuracy under attack: on the test points attacked against the ORIGINAL model
(fixed set); for PGD also adaptive (attack re-run on the retrained model).

Writes defense.json, defense.md and defense.png under --out.
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

from hessfree.apps import defend  # noqa: E402
from hessfree.apps._retrain import fit_model  # noqa: E402
from hessfree.datasets import adult, compas, german  # noqa: E402

RECIPE = dict(epochs=30, lr=0.01, momentum=0.9, batch_size=256, weight_decay=1e-3)
DAMPING = RECIPE["weight_decay"]
LOADERS = {"adult": lambda: adult(n_train=5000), "compas": compas, "german": german}


def factory(arch: str, d: int):
    if arch == "lr":
        return lambda: nn.Linear(d, 1)
    return lambda: nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 1))


def variants(arch: str) -> list[tuple[str, str, str, dict]]:
    """(action, strategy, scorer, extra defend() kwargs) of every method run for ``arch``."""
    out = [(a, "influence", "hessfree", {}) for a in ("remove", "relabel", "reweight")]
    if arch == "lr":
        out += [(a, "influence", "exact", {"hessian": "exact", "damping": DAMPING}) for a in ("remove", "relabel", "reweight")]
    return out + [("remove", "random", "random", {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="German and COMPAS, logistic regression, 2 draws")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--data", default="adult,compas,german")
    ap.add_argument("--models", default="lr,mlp")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/defense"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = ["german", "compas"] if args.quick else args.data.split(",")
    archs = ["lr"] if args.quick else args.models.split(",")
    draws = 2 if args.quick else args.draws
    runs = []
    for name in names:
        d = LOADERS[name]()
        tr, va, te, _, _ = tabular_splits(d)
        for arch in archs:
            make = factory(arch, d.n_features)
            t0 = time.perf_counter()
            base = fit_model(make, *tr, 0, RECIPE)
            for draw in range(draws):
                for action, strategy, scorer, extra in variants(arch):
                    t1 = time.perf_counter()
                    r = defend(make, tr, va, te, action=action, strategy=strategy, attack_seed=draw, seed=0,
                               train_kwargs=RECIPE, base_model=base, progress=False, **extra)  # fmt: skip
                    row = {k: v for k, v in r.to_dict().items() if k != "indices"}
                    runs.append({"data": name, "model": arch, "draw": draw, "scorer": scorer, **row,
                                 "seconds": time.perf_counter() - t1})  # fmt: skip
                write_json(args.out / "defense.json", {"runs": runs, "peak_rss_mb": peak_rss_mb()})
            print(f"{name} {arch}: {time.perf_counter() - t0:.0f}s", flush=True)
    summary, wins = [], []
    for name in names:
        for arch in archs:
            sel = [r for r in runs if r["data"] == name and r["model"] == arch]
            for action, _, scorer, _ in variants(arch):
                rs = [r for r in sel if r["action"] == action and r["scorer"] == scorer]
                row = {"data": name, "model": arch, "method": f"{action} ({scorer})"}
                for c in ("clean_acc_before", "clean_acc_after", "attacked_acc_before", "attacked_acc_after", "seconds"):
                    row[c] = float(np.mean([r[c] for r in rs]))
                if rs[0]["adaptive_acc_after"] is not None:
                    row["adaptive_before"] = float(np.mean([r["adaptive_acc_before"] for r in rs]))
                    row["adaptive_after"] = float(np.mean([r["adaptive_acc_after"] for r in rs]))
                summary.append(row)
            rnd = {r["draw"]: r for r in sel if r["strategy"] == "random"}
            for action, _, scorer, _ in variants(arch)[:-1]:
                inf = {r["draw"]: r for r in sel if r["scorer"] == scorer and r["action"] == action}
                beat = sum(
                    inf[k]["attacked_acc_after"] > max(inf[k]["attacked_acc_before"], rnd[k]["attacked_acc_after"]) for k in inf
                )
                clean_ok = sum(inf[k]["clean_acc_after"] >= inf[k]["clean_acc_before"] - 0.01 for k in inf)
                wins.append({"data": name, "model": arch, "action": f"{action} ({scorer})", "draws": len(inf),
                             "beats_none_and_random": beat, "clean_within_1pt": clean_ok})  # fmt: skip
    md = ["# Defence", "", "Mean over attack draws (accuracies on the reported test half):", ""]
    md.append(markdown_table(summary, ["data", "model", "method", "clean_acc_before", "clean_acc_after",
                                       "attacked_acc_before", "attacked_acc_after", "adaptive_before", "adaptive_after",
                                       "seconds"], {"seconds": "{:.2f}"}))  # fmt: skip
    md += ["", "`seconds`: one defend() call (scoring, retraining, attacks), mean over draws.", ""]
    md += ["", "Draws where the defended model beats both no defence and random removal under attack, and keeps clean accuracy within 1 point:", ""]
    md.append(markdown_table(wins, ["data", "model", "action", "draws", "beats_none_and_random", "clean_within_1pt"]))
    (args.out / "defense.md").write_text("\n".join(md) + "\n")
    write_json(args.out / "defense.json", {"runs": runs, "summary": summary, "wins": wins, "peak_rss_mb": peak_rss_mb()})
    plot(summary, args.out / "defense.png")
    print("\n".join(md))


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["data"], r["model"]) for r in summary})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 3.4))
    labels = ["no defence"] + list(dict.fromkeys(r["method"] for r in summary))
    w = 0.8 / len(labels)
    for j, lab in enumerate(labels):
        vals = []
        for k in keys:
            rs = [r for r in summary if (r["data"], r["model"]) == k]
            vals.append(rs[0]["attacked_acc_before"] if lab == "no defence" else next((r["attacked_acc_after"] for r in rs if r["method"] == lab), np.nan))
        ax.bar(np.arange(len(keys)) + j * w, vals, w, label=lab)
    ax.set_xticks(np.arange(len(keys)) + 0.4, [f"{d}\n{m}" for d, m in keys])
    ax.set_ylabel("accuracy on attacked test points")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
