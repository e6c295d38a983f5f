"""Study: how ``hessfree noisy-labels`` should score every row of a file.

    python benchmarks/noisy_labels_crossfit.py [--seeds 3] [--folds 1,5,10] [--out benchmarks/results/noisy_labels_crossfit]

Every row of the data gets a suspicion score, with the command's own code
(``hessfree.apps.cli_commands.score_rows``) and recipe (SGD lr 0.1, momentum
0.9, batch 128, a checkpoint per epoch, default method and suggested labels):

* ``folds=1``: one model trained on every row scores every row (in-sample
  self-influence over its checkpoints);
* ``folds=K``: K-fold cross-fitting: each row is scored by a model trained on
  the other K-1 folds (out-of-sample).

Settings: every row of scikit-learn digits (1,797) and of the German credit
data (1,000; the loader's train and test splits together), symmetric label
flips at 10% and 20%, the command's default model (MLP, 10 epochs; digits 10%
also 40 epochs, long enough to fit flips) and, for German, logistic regression
too. Reported per setting and scheme (mean over
seeds): ROC-AUC and average precision of the scores against the flips, share
of the flips in the top 10%, share of the flips whose suggested label is the
true one, and seconds. Writes noisy_labels_crossfit.json / .md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import markdown_table, write_json  # noqa: E402

from hessfree.apps.cli_commands import score_rows  # noqa: E402
from hessfree.apps.commands import builtin_table  # noqa: E402
from hessfree.datasets import flip_labels  # noqa: E402
from hessfree.metrics import average_precision, recall_at_k, roc_auc  # noqa: E402

SETTINGS = [  # data, flip rate, model, epochs
    ("digits", 0.1, "mlp", 10),
    ("digits", 0.2, "mlp", 10),
    ("digits", 0.1, "mlp", 40),
    ("german", 0.1, "mlp", 10),
    ("german", 0.1, "lr", 10),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--folds", default="1,5,10")
    ap.add_argument("--settings", default=None, help="indices into SETTINGS, comma-separated (default: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/noisy_labels_crossfit"))
    ap.add_argument("--report-only", action="store_true", help="rebuild the tables from the JSON under --out")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "noisy_labels_crossfit.json").read_text())
        report(saved["runs"], saved["settings"], args.out)
        return
    torch.set_num_threads(1)
    folds = [int(f) for f in args.folds.split(",")]
    chosen = SETTINGS if args.settings is None else [SETTINGS[int(i)] for i in args.settings.split(",")]
    runs = []
    for name, rate, arch, epochs in chosen:
        table, _ = builtin_table(name, seed=0)
        x = table.standardised(np.arange(len(table)))
        k = len(table.labels.classes)
        for seed in range(args.seeds):
            y, flipped = flip_labels(table.y, rate, n_classes=k, seed=seed)
            for f in folds:
                t0 = time.perf_counter()
                s = score_rows(x, y, k, arch=arch, epochs=epochs, seed=seed, folds=f)
                secs = time.perf_counter() - t0
                runs.append({
                    "data": name, "noise": rate, "model": arch, "epochs": epochs, "seed": seed,
                    "scheme": "in-sample (all rows)" if f == 1 else f"cross-fit, {f} folds",
                    "roc_auc": roc_auc(s.score, flipped), "ap": average_precision(s.score, flipped),
                    "top10": recall_at_k(s.score, flipped, fraction=0.1),
                    "suggestion_right_on_flips": float(np.mean(s.suggested[flipped] == table.y[flipped])),
                    "estimated_share": float(np.mean(s.suggested != y)), "seconds": secs,
                })  # fmt: skip
                print(runs[-1], flush=True)
    report(runs, chosen, args.out)


def report(runs: list[dict], settings: list, out: Path) -> None:
    keys = ("roc_auc", "ap", "top10", "suggestion_right_on_flips", "estimated_share", "seconds")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["data"], r["noise"], r["model"], r["epochs"], r["scheme"]), []).append(r)
    mean_rows = [
        {"data": d, "noise": f"{n:.0%}", "model": m, "epochs": e, "scheme": s, "seeds": len(rs),
         **{k: float(np.mean([r[k] for r in rs])) for k in keys}}
        for (d, n, m, e, s), rs in groups.items()
    ]  # fmt: skip
    cols = ["data", "noise", "model", "epochs", "scheme", "seeds", *keys]
    md = ["# Scoring every row: in-sample against cross-fitting (mean over seeds)", "", markdown_table(mean_rows, cols), ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "noisy_labels_crossfit.md").write_text("\n".join(md))
    write_json(out / "noisy_labels_crossfit.json", {"settings": settings, "mean": mean_rows, "runs": runs})
    print("\n".join(md))


if __name__ == "__main__":
    main()
