"""``hessfree demo``: find flipped labels in scikit-learn digits, then repair.

Steps: split digits into train / validation / test, flip a share of the
training labels (seeded), train a small MLP with a checkpoint per epoch, score
every training example with self-influence and with utility influence against
the clean validation split (final model, TracIn-CP over the checkpoints, dropout
members), rank, then remove or relabel the most suspicious share (the share of
examples whose suggested label differs from the given one, an estimate of the
share of wrong labels) and retrain.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import curation, members, metrics, targets
from ._io import atomic_write, atomic_write_json
from ._progress import progress_bar
from .apps import find_noisy_labels
from .datasets import digits, flip_labels
from .influence import Influence
from .task import ClassificationTask
from .training import accuracy, predict, train


def make_mlp(n_in: int = 64, hidden: int = 64, n_out: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def _split(n: int, seed: int, n_train: int, n_val: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def _per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y, reduction="none").numpy()


def _score_methods(model, task, ckpts, lrs, train_xy, val_xy, seed, progress):
    """Suspicion scores (higher = more likely mislabelled) for each method, with timings."""
    utility = targets.Utility(val_xy)
    collections = {
        "final model": None,
        f"TracIn-CP ({len(ckpts)} ckpts)": members.Checkpoints(ckpts, lrs=lrs),
        "dropout x5": members.Dropout(n=5, p_max=0.1, seed=seed),
    }
    out: dict[str, tuple[np.ndarray, float]] = {}
    bar = progress_bar(len(collections) + 2, "scoring (methods)", progress)
    t0 = time.perf_counter()
    out["training loss"] = (_per_example_loss(model, *train_xy), time.perf_counter() - t0)
    for label, coll in collections.items():
        t0 = time.perf_counter()
        est = Influence(task, members=coll, progress=progress).fit(train_xy)
        fit_s = time.perf_counter() - t0
        out[f"self-influence, {label}"] = (est.self_influence(), fit_s)
        t1 = time.perf_counter()
        out[f"utility IP, {label}"] = (-est.influence(utility), fit_s + time.perf_counter() - t1)
        bar.update(1)
    ckpts_members = members.Checkpoints(ckpts, lrs=lrs)
    t0 = time.perf_counter()
    default = find_noisy_labels(task, train_xy, val_xy, members=ckpts_members, progress=progress)
    chose = default.method.removeprefix("auto -> ")
    out[f"hf.apps default (auto: {chose}), TracIn-CP"] = (default.suspicion(), time.perf_counter() - t0)
    bar.update(1)
    t0 = time.perf_counter()
    report = find_noisy_labels(task, train_xy, val_xy, members=ckpts_members, method="class_utility", progress=progress)
    out["hf.apps class-wise utility, TracIn-CP"] = (report.suspicion(), time.perf_counter() - t0)
    bar.update(1)
    bar.close()
    return out, default


def _plot_suspects(plt, path: Path, x, rows, given, predicted, flipped, order, k: int = 24) -> None:
    cols = 8
    n_rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 1.3, n_rows * 1.55))
    for ax, i in zip(axes.ravel(), order[:k]):
        ax.imshow(x[i].reshape(8, 8), cmap="gray_r")
        ax.set_title(f"#{rows[i]} y={given[i]} m={predicted[i]}", fontsize=7, color="crimson" if flipped[i] else "black")
        ax.axis("off")
    fig.suptitle("Most suspicious training examples (#: digits row, y: given label, m: model's label; red: truly flipped)",
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def run_demo(
    out: Path = Path("hessfree-out/demo"),
    seed: int = 0,
    noise: float = 0.10,
    epochs: int = 20,
    n_train: int = 1000,
    n_val: int = 300,
    retrain_seeds: int = 5,
    progress: bool | None = None,
    verbose: bool = True,
    args: dict[str, Any] | None = None,
) -> dict:
    """Run the demo and return its results (also written to ``out/demo.json``).

    The PNG grid of suspects needs matplotlib (the ``plots`` extra); without it
    the demo says so in one line, writes everything else and records
    ``suspects_png: null``. ``args``: the command-line arguments, recorded in
    the JSON.
    """
    from rich.console import Console
    from rich.table import Table

    console = Console(quiet=not verbose, highlight=False)
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if noise <= 0 or int(round(noise * n_train)) < 1:
        raise ValueError(f"noise={noise} flips no label of {n_train}; the demo needs some flipped labels to find")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        console.print("suspects.png will not be written: it needs matplotlib: pip install 'hessfree[plots]'", markup=False, soft_wrap=True)

    x_all, y_all = digits()
    if n_train + n_val >= len(y_all):
        raise ValueError(f"n_train + n_val = {n_train + n_val} leaves no test rows of the {len(y_all)} digits")
    tr, va, te = _split(len(y_all), seed, n_train, n_val)
    y_noisy, flipped = flip_labels(y_all[tr], noise, n_classes=10, seed=seed)
    x_tr, y_tr = torch.from_numpy(x_all[tr]), torch.from_numpy(y_noisy)
    x_va, y_va = torch.from_numpy(x_all[va]), torch.from_numpy(y_all[va])
    x_te, y_te = torch.from_numpy(x_all[te]), torch.from_numpy(y_all[te])
    console.print(
        f"[bold]digits[/bold]: {len(tr)} train ({flipped.sum()} labels flipped, {noise:.0%}), "
        f"{len(va)} clean validation, {len(te)} test; MLP 64-64-10, {epochs} epochs"
    )

    fit_kwargs = dict(epochs=epochs, lr=0.05, momentum=0.9, batch_size=64, seed=seed, progress=progress)
    model = make_mlp()
    result = train(model, (x_tr, y_tr), checkpoints=True, **fit_kwargs)
    task = ClassificationTask(model)

    scores, default = _score_methods(model, task, result.checkpoints, result.lrs, (x_tr, y_tr), (x_va, y_va), seed, progress)
    rows = []
    for name, (s, secs) in scores.items():
        rows.append(
            {
                "method": name,
                "roc_auc": metrics.roc_auc(s, flipped),
                "average_precision": metrics.average_precision(s, flipped),
                "flips_in_top_10pct": metrics.recall_at_k(s, flipped, fraction=0.10),
                "seconds": secs,
            }
        )
    table = Table(title="Detecting flipped labels (higher is better)")
    for col in ("method", "ROC-AUC", "AP", "flips in top 10%", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"], f"{r['roc_auc']:.3f}", f"{r['average_precision']:.3f}",
            f"{r['flips_in_top_10pct']:.3f}", f"{r['seconds']:.2f}",
        )
    console.print(table)

    # curation with the default report: its estimated share of wrong labels, no oracle knowledge
    order = default.index
    predicted = predict(model, x_tr).numpy()
    png = out / "suspects.png" if plt is not None else None
    if plt is not None:
        _plot_suspects(plt, png, x_all[tr], tr, y_noisy, predicted, flipped, order)
    share = default.estimated_noise_share()
    removed = default.flagged()
    _, relabelled = curation.relabel(-default.suspicion(), y_noisy, default.suggestions(), count=len(removed))
    random_removed = np.random.default_rng(seed + 1).choice(len(tr), size=len(removed), replace=False)
    console.print(
        f"estimated share of wrong labels: {share:.1%} (suggested label differs from the given one; "
        f"true share {flipped.mean():.0%}); acting on the {len(removed)} most suspicious"
    )
    bar = progress_bar(5 * retrain_seeds, "retraining", progress)

    def mean_accuracy(**curate) -> tuple[float, float]:
        accs = []
        for s in range(retrain_seeds):
            retrained_model = curation.retrain(make_mlp, x_tr, y_tr, **curate, **{**fit_kwargs, "seed": seed + s, "progress": progress})
            accs.append(accuracy(retrained_model, x_te, y_te))
            bar.update(1)
        return float(np.mean(accs)), float(np.std(accs))

    pct = f"{len(removed) / len(tr):.0%}"
    retrained = {
        "no curation (noisy labels)": mean_accuracy(),
        f"remove {pct} at random": mean_accuracy(remove=random_removed),
        f"remove the {pct} most suspicious": mean_accuracy(remove=removed),
        f"relabel the {pct} most suspicious to the suggested label": mean_accuracy(labels=torch.from_numpy(relabelled)),
        "remove all flipped (oracle)": mean_accuracy(remove=np.flatnonzero(flipped)),
    }
    bar.close()
    acc_table = Table(title=f"Clean test accuracy after curation by the hf.apps default ({retrain_seeds} training seeds)")
    acc_table.add_column("training data")
    acc_table.add_column("test accuracy (mean ± std)", justify="right")
    for k, (mean, std) in retrained.items():
        acc_table.add_row(k, f"{mean:.4f} ± {std:.4f}")
    console.print(acc_table)
    hit = flipped[removed].mean()
    fixed = float(np.mean(relabelled[flipped] == y_all[tr][flipped]))
    console.print(
        f"{hit:.0%} of the flagged examples were truly flipped; relabelling restores the true label of "
        f"{fixed:.0%} of all flips" + (f"; suspects grid: {png}" if png else "")
    )

    suggested = default.suggestions()
    report = {
        "command": "demo",
        "args": args if args is not None else {"out": str(out), "seed": seed, "noise": noise, "epochs": epochs,
                                                "n_train": n_train, "retrain_seeds": retrain_seeds},
        "config": {"seed": seed, "noise": noise, "epochs": epochs, "n_train": len(tr), "n_val": len(va), "n_test": len(te)},
        "labels": {"column": "digits digit", "classes": list(range(10)), "codes": {str(c): c for c in range(10)}},
        "row_numbering": "index into hessfree.datasets.digits() (the loader's order)",
        "training_rows": tr.tolist(),
        "top_suspects": [
            {"row": int(tr[i]), "given_label": int(y_noisy[i]), "true_label": int(y_all[tr][i]),
             "suggested_label": int(suggested[i]), "flipped": bool(flipped[i])}
            for i in order[:24]
        ],
        "detection": rows,
        "estimated_noise_share": share,
        "flagged": int(len(removed)),
        "flagged_truly_flipped_share": float(hit),
        "flips_restored_by_relabelling": fixed,
        "test_accuracy_mean_std": retrained,
        "suspects_png": str(png) if png else None,
        "seconds_total": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "demo.json", report)
    console.print(f"results: {out / 'demo.json'}  ({report['seconds_total']:.1f} s)")
    return report
