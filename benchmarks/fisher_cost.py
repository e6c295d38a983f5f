"""What ``hessian="fisher"`` adds to featurizing a store: the k x k solve's share.

For each model (the MNIST-shaped MLP 784-1024-1024-10 and small CNN of
``throughput.py``, synthetic data, batch 256) and each projection size k
(``Factorized(k)``):

1. ``featurize_s``: ``hf.Influence(task, projection=Factorized(k), store=path).fit(train)``
   on a fresh store (float32): per-example gradients, projection, disk writes;
2. ``fisher_s``: reopening that store with ``hessian="fisher"`` (``fit()``
   without data): ``Phi^T Phi`` streamed from disk (float64, BLAS dsyrk on the
   CPU), damping, Cholesky. The report's own diagnostics (eigenvalue range, or
   the O(k^2) estimates above k = 1024) are timed apart (``report_s``);
3. ``query_s``: scores of 100 test examples against the store (``pairwise``)
   with the transform applied, for scale.

``share = (gram + cholesky) / featurize_s`` is the floor of the issue (<= 0.20);
``share_total`` adds the report and the reopen. The Gram costs ``n k^2``
flops whatever the model, so the share falls with the model's per-example
cost and grows with k: it is largest for small models at large k.

    python benchmarks/fisher_cost.py                 # n = 4000, k = 1024, 2048, 4096, both models
    python benchmarks/fisher_cost.py --quick         # n = 1000, k = 1024, 2048
    python benchmarks/fisher_cost.py --threads 2 --out benchmarks/results/fisher_cost.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _util import markdown_table, write_json  # noqa: E402
from throughput import BATCH, make_data, make_model, make_task  # noqa: E402

import hessfree as hf  # noqa: E402


def one(model_name: str, n: int, k: int, device: str, tmp: Path) -> dict:
    model = make_model(model_name).to(device)
    task = make_task(model_name, model)
    train = make_data(model_name, n)
    test = make_data(model_name, 100, seed=1)
    kw = dict(projection=hf.projections.Factorized(k), batch_size=BATCH, store=tmp / f"{model_name}-{k}",
              progress=False, device=device)  # fmt: skip
    t = time.perf_counter()
    est = hf.Influence(task, **kw).fit(train)
    featurize = time.perf_counter() - t
    t = time.perf_counter()
    fisher = hf.Influence(task, hessian="fisher", **kw).fit()
    reopen_fisher = time.perf_counter() - t
    t = time.perf_counter()
    hf.Influence(task, **kw).fit()
    reopen_plain = time.perf_counter() - t
    rep = fisher.hessian_report_["model"]
    t = time.perf_counter()
    fisher.pairwise(test)
    query = time.perf_counter() - t
    secs = rep["seconds"]
    solve = secs["gram"] + secs["cholesky"]
    del est
    return {
        "model": model_name, "n": n, "k": rep["dim"], "device": device,
        "featurize_s": featurize, "gram_s": secs["gram"], "cholesky_s": secs["cholesky"], "report_s": secs["report"],
        "reopen_fisher_s": reopen_fisher, "reopen_plain_s": reopen_plain, "query_s": query,
        "share": solve / featurize, "share_total": (reopen_fisher - reopen_plain) / featurize,
        "damping": rep["damping"], "max_eigenvalue": rep["max_eigenvalue"],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 1000, k = 1024 and 2048")
    ap.add_argument("--n", type=int, default=None, help="training examples (default 4000; quick 1000)")
    ap.add_argument("--k", default=None, help="comma-separated projection sizes (default 1024,2048,4096)")
    ap.add_argument("--models", default="mlp_big,cnn", help="comma-separated: mlp_big, mlp_small, cnn")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/fisher_cost.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n or (1000 if args.quick else 4000)
    ks = [int(v) for v in (args.k or ("1024,2048" if args.quick else "1024,2048,4096")).split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            for k in ks:
                rows.append(one(model_name, n, k, args.device, Path(tmp)))
                print(rows[-1], flush=True)
    cols = ["model", "n", "k", "featurize_s", "gram_s", "cholesky_s", "report_s", "share", "share_total", "query_s"]
    print(markdown_table(rows, cols, {"share": "{:.1%}", "share_total": "{:.1%}"}))
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "command": " ".join(sys.argv)}  # fmt: skip
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "fisher_cost.json"
    write_json(out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
