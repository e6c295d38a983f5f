"""How the damping of ``hessian="fisher"`` changes attribution quality: LDS on MNIST-5k against the damping ratio.

Setting of ``benchmarks/lds.py`` (docs/fidelity.md part d): the MLP 784-32-10 and the small CNN, 4,000 training
images, 50 test images as targets, LDS over the same 50 saved retrainings of random halves. For each model and
each feature map (Dense and Factorized projections to k, and the exact gradients when D <= 20,000) the script fits
one ``store=`` per feature map and refits the estimator on it once per damping ratio, so every ratio scores the same
features: ``F = Phi^T Phi / n + r * mean_eig * I`` with ``mean_eig = trace(Phi^T Phi / n) / k``
(``hessian_options={"damping_ratio": r}``). It also reports the Ledoit-Wolf shrinkage (Ledoit and Wolf, 2004;
``sklearn.covariance.ledoit_wolf_shrinkage`` on the features, uncentred), a damping chosen from the features alone.

To keep the choice of a ratio apart from the numbers it is judged on, the script reports for each model the ratio
that is best on the *other* model (mean LDS over its feature maps) and the LDS that ratio gives here.

    python benchmarks/fisher_damping.py                      # both models, k = 2048 and 4096
    python benchmarks/fisher_damping.py --model mlp --quick  # smoke run (1,000 images, 20 targets)

Writes ``fisher_damping.json`` and ``fisher_damping.md`` into ``--out``
(default ``benchmarks/results/fisher_damping``); retrainings are read from (or saved to) ``--retrainings``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf_shrinkage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import markdown_table, write_json  # noqa: E402
from fidelity import mnist_split  # noqa: E402
from lds import MODELS, Setting, reuse_parser  # noqa: E402

import hessfree as hf  # noqa: E402
from hessfree import metrics  # noqa: E402

RATIOS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]


def feature_maps(ks: list[int], n_params: int) -> dict[str, object]:
    maps: dict[str, object] = {}
    for k in ks:
        maps[f"Dense k={k}"] = lambda k=k: hf.projections.Dense(k)
        maps[f"Factorized k={k}"] = lambda k=k: hf.projections.Factorized(k)
    if n_params <= 20000:
        maps["exact gradients (k = D)"] = lambda: hf.projections.Factorized(None)
    return maps


def run_model(key: str, args) -> dict:
    label, make = MODELS[key]
    n_train, n_targets = (1000, 20) if args.quick else (4000, 50)
    x, y, xt, yt = mnist_split(n_train, 1000)
    s = Setting(key, make, x, y, xt[:n_targets], yt[:n_targets])
    model, _ = s.fit()
    masks = metrics.subset_masks(n_train, args.subsets, alpha=0.5, seed=0)
    outputs = metrics.retrain_subsets(lambda idx: s.fit(idx)[0], s.measure, masks, progress=None,
                                      results_path=args.retrainings / f"subsets_{key}_{n_train}_{args.subsets}.json")
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for fmap, make_proj in feature_maps(args.k, n_params).items():
        with tempfile.TemporaryDirectory() as tmp:
            kw = dict(batch_size=512, progress=False, projection=make_proj(), store=Path(tmp) / "store")
            t0 = time.perf_counter()
            est = hf.Influence(hf.ClassificationTask(model), **kw).fit((s.x, s.y))  # fills the store once
            featurize_s = time.perf_counter() - t0
            phi = est.query_features((s.x, s.y)).double().numpy()  # the stored rows, for the shrinkage
            shrink = float(ledoit_wolf_shrinkage(phi, assume_centered=True, block_size=4096))
            del phi
            lw_ratio = shrink / (1.0 - shrink)
            for ratio in [*RATIOS, lw_ratio]:
                est = hf.Influence(hf.ClassificationTask(model), hessian="fisher",
                                   hessian_options={"damping_ratio": ratio}, **kw)
                t0 = time.perf_counter()
                sc = est.fit((s.x, s.y)).pairwise((s.xq, s.yq))
                seconds = time.perf_counter() - t0
                lds = metrics.lds_score(sc, masks, outputs)
                rep = next(iter(est.hessian_report_.values()))
                row = {"model": key, "features": fmap, "k": int(rep["dim"]), "damping_ratio": float(ratio),
                       "rule": "Ledoit-Wolf" if ratio is lw_ratio else "fixed", "lds": lds.mean,
                       "condition_number": float(rep.get("condition_number") or rep.get("condition_number_bound")),
                       "seconds_refit_and_score": seconds, "seconds_featurize": featurize_s}
                rows.append(row)
                print(f"[{key}] {fmap:26s} ratio {ratio:7.3f} ({row['rule']}): LDS {lds.mean:.3f} "
                      f"(cond {row['condition_number']:.3g}, {seconds:.1f} s)", flush=True)
    return {"model": label, "n_params": n_params, "n_train": n_train, "n_targets": n_targets,
            "n_subsets": args.subsets, "rows": rows}


def best_fixed_ratio(rows: list[dict]) -> tuple[float, float]:
    """The fixed ratio with the highest mean LDS over the feature maps of ``rows``, and that mean."""
    means = {r: float(np.mean([x["lds"] for x in rows if x["rule"] == "fixed" and x["damping_ratio"] == r]))
             for r in RATIOS}
    best = max(means, key=means.get)
    return best, means[best]


def markdown(results: dict) -> str:
    md = []
    for res in results.values():
        rows = res["rows"]
        fmaps = list(dict.fromkeys(r["features"] for r in rows))
        table_rows = []
        for fm in fmaps:
            mine = [r for r in rows if r["features"] == fm]
            row = {"features": fm}
            for r in mine:
                col = "Ledoit-Wolf" if r["rule"] == "Ledoit-Wolf" else f"r={r['damping_ratio']:g}"
                row[col] = f"{r['lds']:.3f}" + (f" (r={r['damping_ratio']:.2f})" if r["rule"] == "Ledoit-Wolf" else "")
            table_rows.append(row)
        cols = ["features", *[f"r={r:g}" for r in RATIOS], "Ledoit-Wolf"]
        md += [f"## {res['model']} ({res['n_params']:,} parameters): LDS against the damping ratio r\n",
               markdown_table(table_rows, cols), ""]
        if "transfer" in res:
            t = res["transfer"]
            md += [f"Ratio chosen on the other model ({t['chosen_on']}): r = {t['ratio']:g}; here its mean LDS over "
                   f"the feature maps is {t['lds_here']:.3f} against {t['lds_default']:.3f} at the default r = 0.1 "
                   f"(best fixed ratio here: r = {t['best_here']:g}, {t['lds_best_here']:.3f}).\n"]
    return "\n".join(md)


def main() -> None:
    ap = reuse_parser(__doc__, "benchmarks/results/fisher_damping")
    ap.add_argument("--k", type=int, nargs="+", default=[2048, 4096])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {key: run_model(key, args) for key in args.model}
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        for here, other, other_key in ((ra, rb, b), (rb, ra, a)):
            ratio, _ = best_fixed_ratio(other["rows"])
            best_here, lds_best = best_fixed_ratio(here["rows"])
            mean_at = lambda r: float(np.mean([x["lds"] for x in here["rows"]  # noqa: E731
                                                if x["rule"] == "fixed" and x["damping_ratio"] == r]))
            here["transfer"] = {"chosen_on": other_key, "ratio": ratio, "lds_here": mean_at(ratio),
                                "lds_default": mean_at(0.1), "best_here": best_here, "lds_best_here": lds_best}
    write_json(args.out / "fisher_damping.json", results)
    (args.out / "fisher_damping.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
