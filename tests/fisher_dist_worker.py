"""Run under torchrun by tests/test_fisher.py: hessian="fisher" on two ranks, every rank saves."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hessfree as hf


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(75, 6, generator=gen), torch.randint(0, 3, (75,), generator=gen)  # 5 uneven batches of 16
    target = hf.targets.Utility((torch.randn(12, 6, generator=gen), torch.randint(0, 3, (12,), generator=gen)))
    test = (torch.randn(9, 6, generator=gen), torch.randint(0, 3, (9,), generator=gen))
    kw = dict(members=hf.members.Dropout(n=2, p_max=0.3), projection=hf.projections.Factorized(20), batch_size=16,
              hessian="fisher", progress=False)
    return hf.ClassificationTask(model), (x, y), target, test, kw


def results(est, target, test) -> dict[str, np.ndarray]:
    top = est.top_k(test, 5)
    return {
        "influence": est.influence(target, reduce=None),
        "pairwise": est.pairwise(test),
        "self": est.self_influence(),
        "top_idx": top.indices,
        "top_scores": top.scores,
    }


def main(out: str) -> None:
    rank, world = hf.distributed.init("gloo")
    assert world == 2, world
    torch.set_num_threads(1)
    task, train, target, test, kw = setup()
    store = hf.Influence(task, **kw, store=Path(out) / "store").fit(train)
    memory = hf.Influence(task, **kw).fit(train)
    res = {f"store_{k}": v for k, v in results(store, target, test).items()}
    res.update({f"memory_{k}": v for k, v in results(memory, target, test).items()})
    np.savez(Path(out) / f"rank{rank}.npz", **res)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
