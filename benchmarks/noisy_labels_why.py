"""Why the utility form finds flips poorly, and how good the suggested labels are.

    python benchmarks/noisy_labels_why.py [--seed 0] [--out benchmarks/results/noisy_labels]

Anchor setting (MNIST 5k, 4,000 / 1,000, 10% symmetric flips, MLP 784-128-10,
10 epochs, a checkpoint per epoch); validation = first 500 test examples.
Scores from the pairwise influence matrix of the final model (all
parameters): the mean over the validation set (the seed paper's utility form),
restricted to the example's given class, the worst class, and the sum of the
negative entries. Then the share of flipped examples whose true label is
recovered by the model's prediction and by the influence rule
(``suggest="influence"``). Writes why.json and why.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import markdown_table, write_json  # noqa: E402

import hessfree as hf  # noqa: E402
from hessfree.apps import suggest_labels  # noqa: E402
from hessfree.datasets import flip_labels, mnist5k, train_test_split  # noqa: E402
from hessfree.metrics import average_precision, roc_auc  # noqa: E402
from hessfree.training import predict, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/noisy_labels"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    X, Y = mnist5k()
    Xtr, ytr, Xte, yte = train_test_split(X, Y, n_test=1000, seed=args.seed)
    noisy, flipped = flip_labels(ytr, 0.1, n_classes=10, seed=args.seed)
    x, y = torch.from_numpy(Xtr), torch.from_numpy(noisy)
    xv, yv = torch.from_numpy(Xte[:500]), torch.from_numpy(yte[:500])
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    res = train(model, (x, y), epochs=10, lr=0.1, momentum=0.9, batch_size=128, seed=args.seed, checkpoints=True, progress=False)
    task = hf.ClassificationTask(model)
    pair = hf.Influence(task, params="all", progress=False).fit((x, y)).pairwise((xv, yv))  # (500, 4000)
    per_class = np.stack([pair[yv.numpy() == c].mean(0) for c in range(10)])  # (10, 4000)
    scores = {
        "minus mean influence on the validation loss (paper form)": -pair.mean(0),
        "minus influence on the given label's class": -per_class[noisy, np.arange(len(noisy))],
        "minus influence on the worst class (class_utility)": -per_class.min(0),
        "minus the sum of negative pairwise influences": -np.minimum(pair, 0).sum(0),
    }
    rows = [{"score": k, "roc_auc": roc_auc(v, flipped), "ap": average_precision(v, flipped)} for k, v in scores.items()]
    xs, true = x[flipped], ytr[flipped]
    sugg = [{"rule": "model prediction", "correct": float(np.mean(predict(model, xs).numpy() == true))}]
    for name, members in (("influence, final model", None),
                          ("influence, checkpoints", hf.members.Checkpoints(res.checkpoints, res.lrs))):  # fmt: skip
        s, _ = suggest_labels(task, xs, 10, (xv, yv), members, "last", progress=False)
        sugg.append({"rule": f"label that helps most ({name})", "correct": float(np.mean(s == true))})
    md = ["# Why the utility form misses flips", "", markdown_table(rows, ["score", "roc_auc", "ap"]), "",
          "Share of flipped examples whose true label each rule recovers:", "", markdown_table(sugg, ["rule", "correct"])]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "why.md").write_text("\n".join(md) + "\n")
    write_json(args.out / "why.json", {"seed": args.seed, "detection": rows, "suggestions": sugg})
    print("\n".join(md))


if __name__ == "__main__":
    main()
