"""Why TRAK's ensemble gains more from 5 models than ``hessian="fisher"``: the weighting of its curvature.

Setting of ``benchmarks/lds.py`` (docs/fidelity.md part d): MNIST-5k, the MLP 784-32-10 or the small CNN, 4,000
training images, 50 test images as targets (their cross-entropy), LDS over the same 50 saved retrainings of random
halves, ``Dense(k)`` features (k = 2048) of the model and of 4 more trained with seeds 1-4.

For cross-entropy the loss gradient of example i is ``phi_i = -(1 - p_i) * grad m_i``, with ``p_i`` the probability of
its label and ``m_i = log p_i - log(1 - p_i)`` TRAK's margin (exact, by the chain rule through the logits). The
stored features are ``phi_i``; the curvatures compared differ only in the weight ``w_i`` of each example in
``G = sum_i w_i phi_i phi_i^T / n + lambda I`` (``lambda = r * trace / k``, r the damping ratio):

* ``empirical Fisher`` (``hessian="fisher"``): ``w_i = 1``;
* ``margin Gram (TRAK)``: ``w_i = 1 / (1 - p_i)^2``, i.e. ``sum_i grad m_i grad m_i^T``, the kernel TRAK inverts;
* ``Gauss-Newton of the margin``: ``w_i = p_i / (1 - p_i)``, i.e. ``sum_i p_i (1 - p_i) grad m_i grad m_i^T``.

Scores are ``phi_q^T G^{-1} phi_i`` (summed over models), and for the margin Gram also TRAK's way of combining models:
the mean over models of ``phi_q^T G^{-1} grad m_i`` times the mean over models of ``(1 - p_i)``. ``1 - p_i`` is
computed from the logits without cancellation (``exp(logsumexp_{c != y} z_c - logsumexp_c z_c)``). The curvatures
are computed here in float64 from ``est.query_features`` (the library's stored rows), not by the library.

    python benchmarks/fisher_weights.py                    # both models
    python benchmarks/fisher_weights.py --model mlp --quick

Writes ``fisher_weights.json`` and ``fisher_weights.md`` into ``--out`` (default benchmarks/results/fisher_weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import markdown_table, write_json  # noqa: E402
from fidelity import mnist_split  # noqa: E402
from lds import MODELS, Setting, reuse_parser  # noqa: E402

import hessfree as hf  # noqa: E402
from hessfree import metrics  # noqa: E402

RATIOS = [0.1, 1.0, 3.0]
WEIGHTS = {
    "empirical Fisher (hessian='fisher')": lambda q: torch.ones_like(q),
    "margin Gram (TRAK)": lambda q: q.pow(-2.0),
    "Gauss-Newton of the margin": lambda q: (1 - q) / q,
}


def one_minus_p(model, x, y) -> torch.Tensor:
    """``1 - p(y | x)`` per example, float64, from the logits without cancellation."""
    with torch.no_grad():
        z = model(x).double()
        others = z.scatter(1, y[:, None], float("-inf"))
        return torch.exp(torch.logsumexp(others, 1) - torch.logsumexp(z, 1))


def scores(phi: torch.Tensor, q: torch.Tensor, w: torch.Tensor, ratio: float) -> torch.Tensor:
    """``(n_test, n)``: ``q G^{-1} phi^T`` with ``G = phi^T diag(w) phi / n + ratio * mean eigenvalue * I``."""
    g = (phi * w[:, None]).T @ phi / phi.shape[0]
    lam = ratio * torch.diagonal(g).mean()
    return (phi @ torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), q.T)).T


def run_model(key: str, args) -> dict:
    label, make = MODELS[key]
    n_train, n_targets = (1000, 20) if args.quick else (4000, 50)
    x, y, xt, yt = mnist_split(n_train, 1000)
    s = Setting(key, make, x, y, xt[:n_targets], yt[:n_targets])
    masks = metrics.subset_masks(n_train, args.subsets, alpha=0.5, seed=0)
    outputs = metrics.retrain_subsets(lambda idx: s.fit(idx)[0], s.measure, masks, progress=None,
                                      results_path=args.retrainings / f"subsets_{key}_{n_train}_{args.subsets}.json")
    models = [s.fit(seed=seed)[0] for seed in range(5)]  # seed 0 is lds.py's model
    per = []
    for m in models:
        est = hf.Influence(hf.ClassificationTask(m), batch_size=512, progress=False,
                           projection=hf.projections.Dense(args.k)).fit((x, y))
        per.append((est.query_features((x, y)).double(), est.query_features((s.xq, s.yq)).double(),
                    one_minus_p(m, x, y)))
    rows = []
    for name, weight in WEIGHTS.items():
        for ratio in RATIOS:
            one = scores(per[0][0], per[0][1], weight(per[0][2]), ratio).numpy()
            five = sum(scores(phi, q, weight(om), ratio) for phi, q, om in per).numpy()
            rows.append({"curvature": name, "damping_ratio": ratio, "combine": "sum over models",
                         "lds_1_model": metrics.lds_score(one, masks, outputs).mean,
                         "lds_5_models": metrics.lds_score(five, masks, outputs).mean})
            print(f"[{key}] {name:36s} r={ratio:<4g} 1 model {rows[-1]['lds_1_model']:.3f}  "
                  f"5 models {rows[-1]['lds_5_models']:.3f}", flush=True)
    for ratio in RATIOS:  # TRAK's combination: mean kernel scores on grad m, times the mean (1 - p)
        kern = sum(scores(phi, q, om.pow(-2.0), ratio) / om[None, :] for phi, q, om in per) / len(per)
        five = (kern * (sum(om for _, _, om in per) / len(per))[None, :]).numpy()
        rows.append({"curvature": "margin Gram (TRAK)", "damping_ratio": ratio,
                     "combine": "TRAK's: mean kernel x mean (1 - p)", "lds_1_model": None,
                     "lds_5_models": metrics.lds_score(five, masks, outputs).mean})
        print(f"[{key}] margin Gram, TRAK's combination r={ratio:<4g} 5 models {rows[-1]['lds_5_models']:.3f}",
              flush=True)
    return {"model": label, "k": args.k, "n_train": n_train, "n_targets": n_targets, "rows": rows}


def markdown(results: dict) -> str:
    md = []
    for res in results.values():
        table = []
        for r in res["rows"]:
            table.append({"curvature": r["curvature"], "models combined by": r["combine"],
                          "damping ratio": f"{r['damping_ratio']:g}",
                          "LDS, 1 model": "" if r["lds_1_model"] is None else f"{r['lds_1_model']:.3f}",
                          "LDS, 5 models": f"{r['lds_5_models']:.3f}"})
        md += [f"## {res['model']}, Dense k={res['k']}: LDS by the weighting of the curvature\n",
               markdown_table(table, list(table[0])), ""]
    return "\n".join(md)


def main() -> None:
    ap = reuse_parser(__doc__, "benchmarks/results/fisher_weights")
    ap.add_argument("--k", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {key: run_model(key, args) for key in args.model}
    write_json(args.out / "fisher_weights.json", results)
    (args.out / "fisher_weights.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
