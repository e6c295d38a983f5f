"""The trust diagnostic on docs/fidelity.md part (a): where its thresholds come from.

The 2-D logistic regression of ``benchmarks/fidelity.py`` part (a) (150 training
points, L2 lambda = 0.01, LBFGS to the optimum, utility target on 400 held-out
points), with its second feature stretched by c = 1, 4, 16 (condition number of
the damped Hessian 1.6, 21, 327). For each c, ``hf.diagnostics.trust`` against
the exact Hessian (damping = lambda) and the empirical Fisher at its default
damping and at ``damping_ratio`` 1, 0.01 and 0.001, each with a leave-group-out
spot check (30 groups of one example, retrained by the same LBFGS fit).

    python benchmarks/trust.py

Prints a markdown table and writes ``trust.json`` / ``trust.md`` under ``--out``
(default ``benchmarks/results/trust``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _util import markdown_table, write_json
from fidelity import fit_logreg, synthetic_fair_data

import hessfree as hf

OUT = Path(__file__).parent / "results" / "trust"
LAM = 0.01
COMPARATORS = {
    "exact (damping = lambda)": {"hessian": "exact", "damping": LAM},
    "fisher (default damping)": {"hessian": "fisher"},
    "fisher, damping_ratio 1": {"hessian": "fisher", "hessian_options": {"damping_ratio": 1.0}},
    "fisher, damping_ratio 0.01": {"hessian": "fisher", "hessian_options": {"damping_ratio": 0.01}},
    "fisher, damping_ratio 0.001": {"hessian": "fisher", "hessian_options": {"damping_ratio": 0.001}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y, _ = synthetic_fair_data(150, seed=0)
    xv, yv, _ = synthetic_fair_data(400, seed=1)
    rows = []
    for c in (1.0, 4.0, 16.0):
        scale = torch.tensor([1.0, c], dtype=torch.float64)
        xs, xvs = x * scale, xv * scale
        model = fit_logreg(xs, y, LAM)
        for label, kw in COMPARATORS.items():
            start = time.perf_counter()
            rep = hf.diagnostics.trust(hf.ClassificationTask(model), (xs, y), (xvs, yv),
                                       train_fn=lambda idx, xs=xs: fit_logreg(xs, y, LAM, idx), **kw)  # fmt: skip
            gt = rep.ground_truth
            rows.append({"stretch": c, "comparator": label, "condition_number": rep.condition_number,
                         "spearman": rep.spearman, "angle_deg": rep.angle_deg,
                         "overlap_helpful": rep.overlap_helpful, "overlap_harmful": rep.overlap_harmful,
                         "identity_vs_retraining": gt["identity"], "hessian_vs_retraining": gt["hessian"],
                         "verdict": rep.verdict.split(";")[0], "seconds": time.perf_counter() - start})  # fmt: skip
            print(rep, flush=True)
    cols = ["stretch", "comparator", "condition_number", "spearman", "angle_deg", "overlap_helpful",
            "overlap_harmful", "identity_vs_retraining", "hessian_vs_retraining", "verdict"]  # fmt: skip
    md = markdown_table(rows, cols, {"stretch": "{:.0f}", "condition_number": "{:.1f}", "angle_deg": "{:.1f}", "overlap_helpful": "{:.2f}",
                                     "overlap_harmful": "{:.2f}"})  # fmt: skip
    print(md)
    write_json(args.out / "trust.json", {"lambda": LAM, "rows": rows})
    (args.out / "trust.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
