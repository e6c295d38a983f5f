"""Study: how well ``NoisyLabelReport.estimated_noise_share()`` estimates the share
of flipped labels, and the precision of ``flagged()`` (which acts on it).

    python benchmarks/noise_share.py [--seeds 1] [--out benchmarks/results/noise_share]

Same settings, splits, model and recipe as benchmarks/noisy_labels.py; the report is
the default (``method="auto"`` with the validation half, epoch checkpoints as members).
Writes noise_share.json and noise_share.md under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import markdown_table, write_json  # noqa: E402
from noisy_labels import SETTINGS, fit, load_data, noisy_split  # noqa: E402

import hessfree as hf  # noqa: E402
from hessfree.apps import find_noisy_labels  # noqa: E402
from hessfree.training import predict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/noise_share"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data()
    rows = []
    for seed in range(args.seeds):
        for name, kind, rate, epochs in SETTINGS:
            (X, Y), n_test = data[name]
            x, y, _, flipped, val, _ = noisy_split(X, Y, kind, rate, seed, n_test)
            model, res = fit(x, y, seed, epochs, checkpoints=True)
            rep = find_noisy_labels(hf.ClassificationTask(model), (x, y), val=val,
                                    members=hf.members.Checkpoints(res.checkpoints, res.lrs))  # fmt: skip
            rows.append({
                "data": name, "noise": f"{kind[:3]} {rate:.0%}", "epochs": epochs, "seed": seed,
                "true_share": float(flipped.mean()), "estimated_share": rep.estimated_noise_share(),
                "final_model_disagreement": float(np.mean(predict(model, x).numpy() != y.numpy())),
                "precision_of_flagged": float(flipped[rep.flagged()].mean()) if len(rep.flagged()) else float("nan"),
                "recall_of_flagged": float(flipped[rep.flagged()].sum() / flipped.sum()),
            })  # fmt: skip
            print(rows[-1], flush=True)
    cols = ["data", "noise", "epochs", "seed", "true_share", "estimated_share", "final_model_disagreement",
            "precision_of_flagged", "recall_of_flagged"]  # fmt: skip
    md = ["# Estimated share of wrong labels", "", markdown_table(rows, cols), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise_share.md").write_text("\n".join(md))
    write_json(args.out / "noise_share.json", {"runs": rows})
    print("\n".join(md))


if __name__ == "__main__":
    main()
