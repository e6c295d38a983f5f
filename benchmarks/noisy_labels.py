"""Study: finding flipped labels on digits and MNIST 5k, and the clean accuracy
after removing / relabelling the flagged share and retraining.

    python benchmarks/noisy_labels.py [--quick] [--out benchmarks/results/noisy_labels]

Setting (the anchor): 80/20 train/test split (MNIST 5k: 4,000 / 1,000), pixels
in [0, 1], an MLP d-128-10 trained with SGD (lr 0.1, momentum 0.9, batch 128)
with one checkpoint per epoch, 10 epochs (and 40 epochs for the "memorised"
setting). Noise: symmetric 10 / 20 / 40% and one asymmetric setting (20% of
the labels, c -> c+1 among eligible classes). Suspicion is higher = more
likely flipped for every method.

Methods:
  hf-default (auto)   find_noisy_labels with the validation data and the default method="auto":
                      output-space self-influence, or class-utility when the noise looks systematic
  hf-self             output-space self-influence summed over checkpoints, centred by the median
                      of the given class (what "auto" does without validation data)
  hf-self-weights     parameter-space self-influence over checkpoints, output layer, log-mean
                      (the previous default)
  hf-self-final       output-space self-influence of the final model only
  hf-self-dropout     output-space self-influence over 5 dropout members (p_max 0.1) of the final model
  hf-self-noise       output-space self-influence over 5 weight-noise members (relative sigma 0.05)
  hf-utility          the seed paper's form: minus influence on a clean validation loss, over checkpoints
  hf-class-utility    minus the worst per-class validation influence, final model
  hf-combined         z(self) + z(class-utility), both over checkpoints (needs validation data)
  loss                final training loss
  loss-checkpoints    training loss averaged over the epoch checkpoints (a training-dynamics baseline)
  cleanlab            cleanlab label-quality scores from 5-fold cross-validated probabilities
  captum-tracincp     (--peers) Captum TracInCP self-influence over the epoch checkpoints, all layers
  trak                (--peers) TRAK self-influence, 5 independently trained models (4 trained inside
                      the timed call), CPU BasicProjector to 512 dimensions
  kronfluence-ekfac   (--peers) Kronfluence EK-FAC self-influence of the final model, all layers
Peers are benchmark-only (the `bench` extra). Kronfluence must be installed without
its dependencies, or pip replaces the CPU build of torch:
    pip install --no-deps kronfluence
    pip install accelerate einops einconv opt-einsum safetensors tqdm
Validation data for the utility methods: the first half of the test split (clean labels);
accuracy is measured on the other half.

Repair: the top share of the default's ranking (share = the noise rate) is removed, or
relabelled to the default's suggested label (the class of highest probability averaged
over the epoch checkpoints; also to the final model's prediction, for comparison),
and the MLP retrained with the same recipe; so is
the data with exactly the flipped examples removed (oracle) and the noisy data as it is.
Each is retrained with --retrain-seeds seeds (default 3: seed, seed + 1000, seed + 2000;
the first is the noisy model itself) and the accuracies averaged, so one retraining's
luck (a test example or two on digits) does not decide a comparison; the first seed's
numbers are kept as ``acc_*_first``. ``*_estimated``: the same, acting on the share the
report estimates (``report.flagged()``) instead of the true noise rate. The same share is also removed by the rankings of
REPAIR_BY (hf-self, the loss baselines, cleanlab and, with --peers, the peers), to compare
what each ranking's removal buys.

Seconds and peak memory are measured per method in this process (see
benchmarks/_peers.py `measure`): wall time of the scoring call (for cleanlab and
TRAK it includes the models they train), and the peak resident set during the call
minus the resident set before it (Linux VmHWM, reset before each method).

Writes noisy_labels.json, noisy_labels.md and noisy_labels.png under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _peers import captum_tracincp, kronfluence_ekfac, measure, trak_self  # noqa: E402
from _util import markdown_table, write_json  # noqa: E402

import hessfree as hf  # noqa: E402
from hessfree.apps import find_noisy_labels  # noqa: E402
from hessfree.datasets import digits, flip_labels, mnist5k, train_test_split  # noqa: E402
from hessfree.metrics import average_precision, recall_at_k, roc_auc  # noqa: E402
from hessfree.training import accuracy, predict, train  # noqa: E402

RECIPE = dict(lr=0.1, momentum=0.9, batch_size=128)
DEFAULT = "hf-default (auto)"
# (data, noise kind, rate, epochs) of the full study
SETTINGS = (
    ("mnist5k", "symmetric", 0.1, 10), ("mnist5k", "symmetric", 0.1, 40), ("mnist5k", "symmetric", 0.2, 10),
    ("mnist5k", "symmetric", 0.4, 10), ("mnist5k", "asymmetric", 0.2, 10),
    ("digits", "symmetric", 0.1, 10), ("digits", "symmetric", 0.2, 10), ("digits", "symmetric", 0.4, 10),
    ("digits", "asymmetric", 0.2, 10),
)  # fmt: skip
# rankings whose top share is also removed and retrained on in the repair part
REPAIR_BY = ("hf-self", "loss", "loss-checkpoints", "cleanlab", "captum-tracincp", "trak", "kronfluence-ekfac")


def mlp(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 10))


def fit(x, y, seed, epochs, checkpoints=False):
    torch.manual_seed(seed)
    model = mlp(x.shape[1])
    res = train(model, (x, y), epochs=epochs, seed=seed, checkpoints=checkpoints, progress=False, **RECIPE)
    return model, res


def cleanlab_scores(x, y, seed, epochs):
    from cleanlab.rank import get_label_quality_scores

    n = len(y)
    probs = np.zeros((n, 10))
    folds = np.random.default_rng(seed).permutation(n) % 5
    for f in range(5):
        tr, te = folds != f, folds == f
        m, _ = fit(x[tr], y[tr], seed, epochs)
        with torch.no_grad():
            probs[te] = torch.softmax(m(x[te]), -1).numpy()
    return -get_label_quality_scores(y.numpy(), probs)


def methods(model, res, x, y, val, seed, epochs, with_cleanlab, with_peers=False):
    task = hf.ClassificationTask(model)
    ck = hf.members.Checkpoints(res.checkpoints, res.lrs)
    out, chosen = {}, {}

    def timed(name, fn):
        s, sec, mb = measure(fn)
        if isinstance(s, tuple):  # (scores, what the default chose), back from the measuring child
            s, info = s
            chosen.update(info)
        out[name] = (np.asarray(s, dtype=float), sec, mb)

    def default():
        rep = find_noisy_labels(task, (x, y), val=val, members=ck)
        return rep.suspicion(), {"method": rep.method, **rep.diagnostics, "suggestions": rep.suggestions().tolist(),
                                 "estimated_share": rep.estimated_noise_share()}  # fmt: skip

    timed(DEFAULT, default)
    timed("hf-self", lambda: find_noisy_labels(task, (x, y), members=ck, method="self").suspicion())
    timed("hf-self-weights", lambda: find_noisy_labels(task, (x, y), members=ck, method="self_weights").suspicion())
    timed("hf-self-final", lambda: find_noisy_labels(task, (x, y), method="self").suspicion())
    timed("hf-self-dropout", lambda: find_noisy_labels(task, (x, y), members=hf.members.Dropout(5, 0.1, seed=seed),
                                                       method="self").suspicion())
    timed(
        "hf-self-noise",
        lambda: find_noisy_labels(task, (x, y), members=hf.members.WeightNoise(5, 0.05, seed=seed, relative=True),
                                  method="self").suspicion(),
    )
    timed("hf-utility", lambda: find_noisy_labels(task, (x, y), val=val, members=ck, method="utility").suspicion())
    timed("hf-class-utility", lambda: find_noisy_labels(task, (x, y), val=val, method="class_utility").suspicion())
    timed("hf-combined", lambda: find_noisy_labels(task, (x, y), val=val, members=ck, method="combined").suspicion())

    def loss():
        with torch.no_grad():
            return F.cross_entropy(model(x), y, reduction="none").numpy()

    timed("loss", loss)

    def loss_checkpoints():
        probe = mlp(x.shape[1])
        total = np.zeros(len(y))
        with torch.no_grad():
            for state in res.checkpoints:
                probe.load_state_dict(state)
                total += F.cross_entropy(probe(x), y, reduction="none").numpy()
        return total / len(res.checkpoints)

    timed("loss-checkpoints", loss_checkpoints)
    if with_cleanlab:
        timed("cleanlab", lambda: cleanlab_scores(x, y, seed, epochs))
    if with_peers:
        make = lambda: mlp(x.shape[1])  # noqa: E731
        timed("captum-tracincp", lambda: captum_tracincp(make, res.checkpoints, res.lrs, x, y))
        timed("trak", lambda: trak_self(make, lambda s: fit(x, y, seed + s, epochs)[0], x, y, first=model))
        timed("kronfluence-ekfac", lambda: kronfluence_ekfac(model, x, y))
    out["_chosen"] = chosen
    return out


def load_data() -> dict:
    """``name -> ((X, Y), test size)`` of the study's data sets."""
    return {"mnist5k": (mnist5k(), 1000), "digits": (digits(), 360)}


def noisy_split(X, Y, kind, rate, seed, n_test):
    """The study's split and flips: ``(x, y_noisy, y_true, flipped, val, test)``; the
    test split is halved into a clean validation half and a reported half."""
    Xtr, ytr, Xte, yte = train_test_split(X, Y, n_test=n_test, seed=seed)
    mapping = {c: (c + 1) % 10 for c in range(0, 10, 2)} if kind == "asymmetric" else None
    noisy, flipped = flip_labels(ytr, rate, n_classes=10, seed=seed, kind=kind, mapping=mapping)
    h = len(yte) // 2
    val = (torch.from_numpy(Xte[:h]), torch.from_numpy(yte[:h]))
    test = (torch.from_numpy(Xte[h:]), torch.from_numpy(yte[h:]))
    return torch.from_numpy(Xtr), torch.from_numpy(noisy), ytr, flipped, val, test


def run_setting(name, X, Y, kind, rate, seed, epochs, with_cleanlab, n_test, with_peers=False, retrain_seeds=3):
    x, y, ytr, flipped, (xv, yv), (xt, yt) = noisy_split(X, Y, kind, rate, seed, n_test)
    model, res = fit(x, y, seed, epochs, checkpoints=True)
    scores = methods(model, res, x, y, (xv, yv), seed, epochs, with_cleanlab, with_peers)
    chosen = scores.pop("_chosen")
    suggestions = np.asarray(chosen.pop("suggestions"))
    estimated_share = chosen.pop("estimated_share")
    rows = []
    for m, (s, sec, mb) in scores.items():
        rows.append({
            "data": name, "noise": f"{kind[:3]} {rate:.0%}", "epochs": epochs, "seed": seed, "method": m,
            "roc_auc": roc_auc(s, flipped), "ap": average_precision(s, flipped),
            "top10": recall_at_k(s, flipped, fraction=0.1), "top20": recall_at_k(s, flipped, fraction=0.2),
            "seconds": sec, "peak_mb": mb, **({"auto_chose": chosen} if m == DEFAULT else {}),
        })  # fmt: skip
    # repair: act on the flagged share (= the noise rate) of the default's ranking, retrain with
    # retrain_seeds seeds (seed + 1000 r; r = 0 is the seed the noisy model was trained with)
    harm = -scores[DEFAULT][0]  # curation acts on the lowest scores
    k = int(flipped.sum())
    k_est = int(round(estimated_share * len(y)))  # as report.flagged() does
    pred = predict(model, x).numpy()

    def relabelled(new_labels, count):
        return torch.from_numpy(hf.curation.relabel(harm, y, new_labels, count=count)[1]).to(y.dtype)

    arms = {
        "all_noisy": ({}, y), "removed": ({"remove": hf.curation.remove(harm, count=k)}, y),
        "relabelled": ({}, relabelled(suggestions, k)), "relabelled_prediction": ({}, relabelled(pred, k)),
        "oracle_removed": ({"remove": np.flatnonzero(flipped)}, y),
        # acting on the share the report estimates (no knowledge of the true noise rate)
        "removed_estimated": ({"remove": hf.curation.remove(harm, count=k_est)}, y),
        "relabelled_estimated": ({}, relabelled(suggestions, k_est)),
    }  # fmt: skip
    for other in REPAIR_BY:  # the same removal by the other rankings, where they ran
        if other in scores:
            arms[f"removed_by:{other}"] = ({"remove": hf.curation.remove(-scores[other][0], count=k)}, y)
    per_seed = {arm: [] for arm in arms}
    for r in range(retrain_seeds):
        for arm, (kw, labels) in arms.items():
            m = model if (arm == "all_noisy" and r == 0) else hf.curation.retrain(
                lambda: mlp(x.shape[1]), x, labels, seed=seed + 1000 * r, epochs=epochs, progress=False, **kw, **RECIPE
            )  # fmt: skip
            per_seed[arm].append(accuracy(m, xt, yt))
    repair = {
        "data": name, "noise": f"{kind[:3]} {rate:.0%}", "epochs": epochs, "seed": seed, "retrain_seeds": retrain_seeds,
        **{f"acc_{arm}": float(np.mean(v)) for arm, v in per_seed.items()},
        **{f"acc_{arm}_first": v[0] for arm, v in per_seed.items()},
        "per_retrain_seed": per_seed,
        "estimated_share": estimated_share,
        "suggestion_correct_on_flips": float(np.mean(suggestions[flipped] == ytr[flipped])),
        "prediction_correct_on_flips": float(np.mean(pred[flipped] == ytr[flipped])),
    }  # fmt: skip
    return rows, repair


def summarise(rows, keys):
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        row["seeds"] = len(rs)
        for c in rs[0]:
            if c not in keys and c != "seed" and isinstance(rs[0][c], float):
                row[c] = float(np.mean([r[c] for r in rs]))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, MNIST 5k 10%% and digits 20%% only, no cleanlab")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/noisy_labels"))
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="rebuild the tables in --out from the noisy_labels.json of these result folders (rows of the "
                         "same setting, method and seed must not repeat)")
    ap.add_argument("--no-cleanlab", action="store_true")
    ap.add_argument("--retrain-seeds", type=int, default=3,
                    help="repair accuracies are means over this many retraining seeds (seed + 1000 r)")
    ap.add_argument("--peers", action="store_true", help="also run Captum TracInCP, TRAK and Kronfluence EK-FAC (bench extra)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the tables from --out/noisy_labels.json")
    ap.add_argument("--settings", default=None,
                    help="comma list of data:kind:rate:epochs, e.g. mnist5k:symmetric:0.1:10 (the anchor); default: all")  # fmt: skip
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "noisy_labels.json").read_text())
        report(saved["detection"], saved["repair"], args.out)
        return
    if args.merge:
        detection, repair = merged(args.merge)
        args.out.mkdir(parents=True, exist_ok=True)
        report(detection, repair, args.out)
        return
    torch.set_num_threads(1)
    data = load_data()
    settings = [("mnist5k", "symmetric", 0.1, 10), ("digits", "symmetric", 0.2, 10)]
    if not args.quick:
        settings = list(SETTINGS)
    if args.settings:
        settings = [_parse_setting(t) for t in args.settings.split(",")]
    seeds = [0] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    rows, repairs = [], []
    for seed in seeds:
        for name, kind, rate, epochs in settings:
            (X, Y), n_test = data[name]
            t0 = time.perf_counter()
            r, rep = run_setting(name, X, Y, kind, rate, seed, epochs, not (args.quick or args.no_cleanlab), n_test,
                                   args.peers, 1 if args.quick else args.retrain_seeds)  # fmt: skip
            rows += r
            repairs.append(rep)
            print(f"{name} {kind} {rate} {epochs}ep seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
            write_json(args.out / "noisy_labels.json", {"detection": rows, "repair": repairs})
    report(rows, repairs, args.out)


def report(rows: list[dict], repairs: list[dict], out: Path) -> None:
    """Write noisy_labels.md / .json / .png under ``out`` from per-seed rows."""
    det = summarise(rows, ["data", "noise", "epochs", "method"])
    rep = summarise(repairs, ["data", "noise", "epochs"])
    md = ["# Noisy labels", "", "Detection (mean over seeds; suspicion vs the true flip mask):", ""]
    md.append(markdown_table(det, ["data", "noise", "epochs", "method", "seeds", "roc_auc", "ap", "top10", "top20", "seconds",
                                  "peak_mb"], {"seconds": "{:.1f}", "peak_mb": "{:.0f}"}))  # fmt: skip
    md += ["", "Clean test accuracy after acting on the flagged share of the default ranking and retraining (each run:",
           "mean over its retraining seeds; then mean over runs):", ""]
    md.append(markdown_table(rep, ["data", "noise", "epochs", "seeds", "acc_all_noisy", "acc_removed", "acc_relabelled",
                                   "acc_relabelled_prediction", "acc_oracle_removed", "suggestion_correct_on_flips",
                                   "prediction_correct_on_flips"]))  # fmt: skip
    md += ["", "`acc_relabelled`: relabelled to the default suggestion (the class of highest probability averaged over",
           "the epoch checkpoints); `acc_relabelled_prediction`: to the final model's prediction.", ""]
    if "acc_removed_estimated" in rep[0]:
        md += ["Acting on the share the report estimates (`report.flagged()`, no knowledge of the noise rate):", ""]
        md.append(markdown_table(rep, ["data", "noise", "epochs", "seeds", "estimated_share", "acc_all_noisy",
                                       "acc_removed_estimated", "acc_relabelled_estimated"]))  # fmt: skip
    by = removal_by_method(repairs)
    if by:
        md += ["", "Removing the same share by each ranking and retraining: mean clean test accuracy (over runs, each",
               "the mean over its retraining seeds) and the runs where it beats training on all the noisy data:", ""]
        md.append(markdown_table(by, ["data", "noise", "epochs", "ranking", "runs", "acc_removed", "minus_all_noisy", "wins"]))
    md += ["", "Rank on AP (1 = best of all methods) and AP minus the loss baseline's, per setting:", ""]
    md.append(markdown_table(ranks(det), ["data", "noise", "epochs", "rank_default", "default_minus_loss", "rank_combined",
                                          "combined_minus_loss", "best"]))  # fmt: skip
    picks = [{"data": r["data"], "noise": r["noise"], "epochs": r["epochs"], "seed": r["seed"], "chose": r["auto_chose"]["method"],
              "overlap_cu_utility": r["auto_chose"].get("overlap_class_utility_utility", ""),
              "overlap_cu_self": r["auto_chose"].get("overlap_class_utility_self", "")}
             for r in rows if r.get("auto_chose")]  # fmt: skip
    if picks:
        md += ["", "What the default (`method=\"auto\"`, with the validation data) chose, and the top-10% overlaps behind it:", ""]
        md.append(markdown_table(picks, ["data", "noise", "epochs", "seed", "chose", "overlap_cu_utility", "overlap_cu_self"]))
    md += ["", "Runs (noise seeds) where retraining after acting on the flagged share beats retraining on all the noisy",
           "data: on the mean over the retraining seeds, and (`*_first`) with the first retraining seed only:", ""]
    md.append(markdown_table(wins(repairs), ["data", "noise", "epochs", "seeds", "retrain_seeds", "removal_wins",
                                             "relabel_wins", "either_wins", "removal_wins_first", "relabel_wins_first",
                                             "estimated_share_wins"]))  # fmt: skip
    md += ["", "`seconds`: wall time of each method's call; `peak_mb`: its peak resident memory above the process's",
           "resident set before the call (see benchmarks/_peers.py `measure`)."]
    (out / "noisy_labels.md").write_text("\n".join(md) + "\n")
    write_json(out / "noisy_labels.json", {"detection": rows, "repair": repairs, "summary": det, "repair_summary": rep})
    plot(det, out / "noisy_labels.png")
    print("\n".join(md))


def merged(folders: list[Path]) -> tuple[list[dict], list[dict]]:
    """Detection and repair rows of several result folders; a (setting, method,
    seed) found twice is an error, so no run is counted twice."""
    detection, repair, seen = [], [], set()
    for folder in folders:
        saved = json.loads((folder / "noisy_labels.json").read_text())
        for r in saved["detection"]:
            key = (r["data"], r["noise"], r["epochs"], r["method"], r["seed"])
            if key in seen:
                raise SystemExit(f"--merge: {key} appears twice (again in {folder}); merge folders of different seeds or settings")
            seen.add(key)
            detection.append(r)
        for r in saved["repair"]:
            key = (r["data"], r["noise"], r["epochs"], "repair", r["seed"])
            if key in seen:
                raise SystemExit(f"--merge: {key} appears twice (again in {folder}); merge folders of different seeds or settings")
            seen.add(key)
            repair.append(r)
    return detection, repair


def _parse_setting(text: str) -> tuple[str, str, float, int]:
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in ("mnist5k", "digits") or parts[1] not in ("symmetric", "asymmetric"):
        raise SystemExit(f"--settings: expected data:kind:rate:epochs like mnist5k:symmetric:0.1:10, got {text!r}")
    return parts[0], parts[1], float(parts[2]), int(parts[3])


def ranks(det):
    out = []
    for key in sorted({(r["data"], r["noise"], r["epochs"]) for r in det}):
        rs = sorted((r for r in det if (r["data"], r["noise"], r["epochs"]) == key), key=lambda r: -r["ap"])
        ap = {r["method"]: r["ap"] for r in rs}
        names = [r["method"] for r in rs]
        out.append({
            "data": key[0], "noise": key[1], "epochs": key[2],
            "rank_default": names.index(DEFAULT) + 1, "default_minus_loss": ap[DEFAULT] - ap["loss"],
            "rank_combined": names.index("hf-combined") + 1 if "hf-combined" in ap else "",
            "combined_minus_loss": ap["hf-combined"] - ap["loss"] if "hf-combined" in ap else "",
            "best": names[0],
        })  # fmt: skip
    return out


def removal_by_method(repairs):
    out = []
    for key in sorted({(r["data"], r["noise"], r["epochs"]) for r in repairs}):
        rs = [r for r in repairs if (r["data"], r["noise"], r["epochs"]) == key]
        for ranking in (DEFAULT, *REPAIR_BY):
            col = "acc_removed" if ranking == DEFAULT else f"acc_removed_by:{ranking}"
            have = [r for r in rs if col in r]
            if not have:
                continue
            out.append({
                "data": key[0], "noise": key[1], "epochs": key[2], "ranking": ranking, "runs": len(have),
                "acc_removed": float(np.mean([r[col] for r in have])),
                "minus_all_noisy": float(np.mean([r[col] - r["acc_all_noisy"] for r in have])),
                "wins": sum(r[col] > r["acc_all_noisy"] for r in have),
            })  # fmt: skip
    return out


def wins(repairs):
    out = []
    for key in sorted({(r["data"], r["noise"], r["epochs"]) for r in repairs}):
        rs = [r for r in repairs if (r["data"], r["noise"], r["epochs"]) == key]
        first = [{k.removesuffix("_first"): v for k, v in r.items() if k.endswith("_first")} or r for r in rs]
        out.append({
            "data": key[0], "noise": key[1], "epochs": key[2], "seeds": len(rs),
            "retrain_seeds": min(r.get("retrain_seeds", 1) for r in rs),
            "removal_wins": sum(r["acc_removed"] > r["acc_all_noisy"] for r in rs),
            "relabel_wins": sum(r["acc_relabelled"] > r["acc_all_noisy"] for r in rs),
            "either_wins": sum(max(r["acc_removed"], r["acc_relabelled"]) > r["acc_all_noisy"] for r in rs),
            "estimated_share_wins": sum(max(r.get("acc_removed_estimated", 0.0), r.get("acc_relabelled_estimated", 0.0))
                                        > r["acc_all_noisy"] for r in rs),
            "removal_wins_first": sum(r["acc_removed"] > r["acc_all_noisy"] for r in first),
            "relabel_wins_first": sum(r["acc_relabelled"] > r["acc_all_noisy"] for r in first),
        })  # fmt: skip
    return out


def plot(det, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["data"], r["noise"], r["epochs"]) for r in det})
    meths = sorted({r["method"] for r in det})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(settings)), 3.6))
    w = 0.8 / len(meths)
    for j, m in enumerate(meths):
        vals = [next((r["ap"] for r in det if (r["data"], r["noise"], r["epochs"]) == s and r["method"] == m), 0) for s in settings]
        ax.bar(np.arange(len(settings)) + j * w, vals, w, label=m)
    ax.set_xticks(np.arange(len(settings)) + 0.4, [f"{d}\n{n} {e}ep" for d, n, e in settings], fontsize=7)
    ax.set_ylabel("average precision")
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
