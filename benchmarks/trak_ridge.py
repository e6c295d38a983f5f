"""TRAK with a ridge term: LDS of ``traker`` against its ``lambda_reg`` on MNIST-5k (benchmarks/lds.py's setting).

TRAK at its defaults inverts ``X^T X`` undamped; ``lambda_reg`` adds ``lambda I``. For each model this sweeps
``lambda_reg`` over 0 and 1e-2 ... 1e4 for TRAK with one model at ``--k`` and prints the LDS of each, then TRAK with
5 models at the model's own best value (an oracle: chosen on the targets it is scored on). benchmarks/lds.py runs
TRAK with 1 and 5 models at the value best on the *other* model (``TRAK_RIDGE`` there).

    python benchmarks/trak_ridge.py                 # both models, k = 2048 (peers environment, see lds.py)

Writes ``trak_ridge.json`` into ``--out`` (default ``benchmarks/results/lds``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import trak_scores  # noqa: E402
from _util import write_json  # noqa: E402
from fidelity import mnist_split  # noqa: E402
from lds import MODELS, Setting  # noqa: E402

from hessfree import metrics  # noqa: E402

LAMBDAS = [0.0, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lds"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {}
    for key in args.model:
        _, make = MODELS[key]
        x, y, xt, yt = mnist_split(4000, 1000)
        s = Setting(key, make, x, y, xt[:50], yt[:50])
        model, _ = s.fit()
        masks = metrics.subset_masks(4000, 50, alpha=0.5, seed=0)
        outputs = metrics.retrain_subsets(lambda idx, s=s: s.fit(idx)[0], s.measure, masks, progress=None,
                                          results_path=args.out / f"subsets_{key}_4000_50.json")  # fmt: skip
        rows = []
        for lam in LAMBDAS:
            t = time.perf_counter()
            sc = trak_scores(s.make, [model], s.x, s.y, s.xq, s.yq, args.k, lambda_reg=lam).T
            rows.append({"lambda_reg": lam, "lds": metrics.lds_score(sc, masks, outputs).mean,
                         "seconds": time.perf_counter() - t})  # fmt: skip
            print(f"[{key}] TRAK k={args.k}, 1 model, lambda_reg {lam:g}: LDS {rows[-1]['lds']:.3f}", flush=True)
        best = max(rows, key=lambda r: r["lds"])["lambda_reg"]
        # TRAK with 5 models at this model's own best ridge: an oracle (chosen on the targets it is scored on)
        t = time.perf_counter()
        ens = [model, *[s.fit(seed=seed)[0] for seed in range(1, 5)]]
        sc = trak_scores(s.make, ens, s.x, s.y, s.xq, s.yq, args.k, lambda_reg=best).T
        oracle = {"lambda_reg": best, "lds": metrics.lds_score(sc, masks, outputs).mean,
                  "seconds": time.perf_counter() - t}  # fmt: skip
        print(f"[{key}] TRAK k={args.k}, 5 models, lambda_reg {best:g} (oracle): LDS {oracle['lds']:.3f}", flush=True)
        result[key] = {"k": args.k, "rows": rows, "best": best, "five_models_at_best": oracle}
    write_json(args.out / "trak_ridge.json", result)


if __name__ == "__main__":
    main()
