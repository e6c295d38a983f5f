"""Bodies of the application commands (kept out of cli.py so it stays small)."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import members as hf_members
from ..datasets import flip_labels
from ..metrics import average_precision, recall_at_k, roc_auc
from ..task import ClassificationTask
from ..training import accuracy, predict, train
from . import commands as C
from .defense import defend
from .fairness import repair_fairness
from .noisy_labels import find_noisy_labels


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _echo(msg: str) -> None:
    tqdm.write(msg)


def run_noisy_labels(data, csv, label, features, out, arch, epochs, noise, method, top, seed, n_train, suggest="members") -> dict:
    split = C.load(data, csv, label, None, features, seed, n_train)
    x, y = split.tensors("train")
    k = int(max(split.y.max(), split.yv.max(), split.yt.max())) + 1
    flipped = None
    if noise > 0:
        noisy, flipped = flip_labels(split.y, noise, n_classes=k, seed=seed)
        y = torch.from_numpy(noisy)
    torch.manual_seed(seed)
    model = C.make_model_factory(arch, x.shape[1], k)()
    res = train(model, (x, y), epochs=epochs, lr=0.1, momentum=0.9, seed=seed, checkpoints=True, progress=True)
    t0 = time.perf_counter()
    report = find_noisy_labels(
        ClassificationTask(model), (x, y), val=split.tensors("val") if method not in ("self", "self_weights") else None,
        members=hf_members.Checkpoints(res.checkpoints, res.lrs), method=method, suggest=suggest, progress=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    n_flag = len(report.flagged(top))
    payload = {
        "data": split.name, "model": arch, "epochs": epochs, "method": report.method, "diagnostics": report.diagnostics, "seed": seed,
        "n_train": len(report), "seconds_scoring": seconds, "estimated_noise_share": report.estimated_noise_share(),
        "test_accuracy": accuracy(model, *split.tensors("test")),
        "flagged": report.top(n_flag).to_records(),
    }  # fmt: skip
    if flipped is not None:
        s = report.suspicion()
        payload["detection"] = {
            "noise": noise, "roc_auc": roc_auc(s, flipped), "average_precision": average_precision(s, flipped),
            "recall_top10": recall_at_k(s, flipped, fraction=0.1), "recall_top20": recall_at_k(s, flipped, fraction=0.2),
            "suggestion_correct_on_flips": float(np.mean(report.suggestions()[flipped] == split.y[flipped])),
            "prediction_correct_on_flips": float(np.mean(predict(model, x[flipped]).numpy() == split.y[flipped])),
        }  # fmt: skip
        _echo(
            f"flips: ROC-AUC {payload['detection']['roc_auc']:.3f}, AP {payload['detection']['average_precision']:.3f}, "
            f"top 10% recall {payload['detection']['recall_top10']:.3f}; suggested label right on "
            f"{payload['detection']['suggestion_correct_on_flips']:.0%} of the flips"
        )
    path = C.write_json(out, "noisy_labels.json", {**payload, "table": report.to_dict()})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    s = report.suspicion()
    if flipped is not None:
        ax.hist([s[~flipped], s[flipped]], bins=50, stacked=True, label=["clean", "flipped"])
        ax.legend()
    else:
        ax.hist(s, bins=50)
    ax.set_xlabel(f"suspicion ({method})")
    ax.set_ylabel("training examples")
    C.save_figure(fig, out, "noisy_labels.png")
    plt.close(fig)
    how = f"--top {top:g}" if top is not None else f"the estimated share of wrong labels, {report.estimated_noise_share():.1%}"
    _echo(f"wrote {path} and {out / 'noisy_labels.png'}; {n_flag} suspects flagged ({how})")
    return payload


def run_defend(data, csv, label, features, out, arch, epochs, action, fraction, draws, seed, n_train) -> dict:
    split = C.load(data, csv, label, None, features, seed, n_train)
    k = int(max(split.y.max(), split.yt.max())) + 1
    if k != 2 and arch == "lr":
        raise ValueError("defend with --model lr uses the binary LinearMinimal attack; use --model mlp for more classes")
    make = C.make_model_factory(arch, split.x.shape[1], k)
    tk = {"epochs": epochs, "lr": 0.05, "momentum": 0.9, "batch_size": 128}
    rows = []
    for draw in tqdm(range(draws), desc="attack draws"):
        for strategy in ("influence", "random"):
            r = defend(
                make, split.tensors("train"), split.tensors("val"), split.tensors("test"), action=action,
                fraction=fraction, attack_seed=draw, strategy=strategy, seed=seed, train_kwargs=tk,
            )  # fmt: skip
            rows.append(r.to_dict())
    payload = {"data": split.name, "model": arch, "action": action, "fraction": fraction, "runs": rows}
    path = C.write_json(out, "defend.json", payload)
    plt = _plt()
    inf = [r for r in rows if r["strategy"] == "influence"]
    rnd = [r for r in rows if r["strategy"] == "random"]
    vals = {
        "no defence": np.mean([r["attacked_acc_before"] for r in inf]),
        "random": np.mean([r["attacked_acc_after"] for r in rnd]),
        "hessfree": np.mean([r["attacked_acc_after"] for r in inf]),
    }
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(list(vals), list(vals.values()))
    ax.set_ylabel("accuracy on attacked test points")
    ax.set_title(f"{split.name}, {arch}, {action} {fraction:.0%}")
    C.save_figure(fig, out, "defend.png")
    plt.close(fig)
    _echo(" | ".join(f"{k_}: {v:.3f}" for k_, v in vals.items()) + f"; wrote {path}")
    return payload


def run_fairness(data, csv, label, group, features, out, arch, epochs, metric, action, fractions, seed, n_train) -> dict:
    split = C.load(data, csv, label, group, features, seed, n_train)
    if split.g is None:
        raise ValueError("fairness needs groups: use a tabular built-in data set or pass --group COLUMN with --csv")
    if int(max(split.y.max(), split.yt.max())) + 1 != 2:
        raise ValueError("fairness repair needs binary labels")
    try:
        fr = [float(f) for f in fractions.split(",")]
    except ValueError as e:
        raise ValueError(f"--fractions must be comma-separated numbers, got {fractions!r}") from e
    make = C.make_model_factory(arch, split.x.shape[1], 2)
    tk = {"epochs": epochs, "lr": 0.05, "momentum": 0.9, "batch_size": 128}
    results = {}
    for strategy in tqdm(("influence", "random"), desc="strategies"):
        results[strategy] = repair_fairness(
            make, split.tensors("train"), split.tensors("val"), split.gv, split.tensors("test"), split.gt,
            metric=metric, action=action, fractions=fr, favourable=split.favourable, strategy=strategy,
            seed=seed, train_kwargs=tk,
        )  # fmt: skip
    payload = {"data": split.name, "model": arch, "metric": metric, "action": action}
    payload.update({k: {kk: vv for kk, vv in v.to_dict().items() if kk != "scores"} for k, v in results.items()})
    path = C.write_json(out, "fairness.json", payload)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for strategy, r in results.items():
        ax.plot([p.accuracy for p in r.curve], [p.gap for p in r.curve], "o-", label=strategy)
    ax.plot([results["influence"].acc_before], [results["influence"].gap_before], "k*", markersize=12, label="before")
    ax.set_xlabel("test accuracy")
    ax.set_ylabel(f"{metric.upper()} gap")
    ax.legend()
    C.save_figure(fig, out, "fairness.png")
    plt.close(fig)
    best = results["influence"].best()
    _echo(
        f"gap before {results['influence'].gap_before:.3f}; "
        + (f"best within 1 point of accuracy: {best.gap:.3f} at {best.fraction:.0%}" if best else "no point within 1 point")
        + f"; wrote {path}"
    )
    return payload
