"""Run under torchrun by tests/test_distributed.py: fit and score on every rank, rank 0 saves."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_distributed import results, setup  # noqa: E402

import hessfree as hf  # noqa: E402


def main(out: str, mode: str) -> None:
    rank, world = hf.distributed.init("gloo")
    assert world == 2, world
    torch.set_num_threads(1)
    task, train, target, test = setup()
    if mode == "mismatch":  # rank 1 holds different data: every rank must fail, none may hang
        other = (train[0].flip(0), train[1].flip(0)) if rank == 1 else train
        shorter = (train[0][: 70 if rank == 1 else 75], train[1][: 70 if rank == 1 else 75])
        est = hf.Influence(task, **setup.kwargs).fit(train)
        test2 = (test[0] + rank, test[1])
        target2 = hf.targets.Utility((target.source.tensors()[0] * (1 + rank), target.source.tensors()[1]))
        cases = {
            "store": lambda: hf.Influence(task, **setup.kwargs, store=Path(out) / "store").fit(other),
            "memory": lambda: hf.Influence(task, **setup.kwargs).fit(other),
            "length": lambda: hf.Influence(task, **setup.kwargs).fit(shorter),
            "test": lambda: est.pairwise(test2),
            "top_k": lambda: est.top_k(test2, 3),
            "target": lambda: est.influence(target2),
        }
        for case, run in cases.items():
            try:
                run()
                (Path(out) / f"{case}{rank}.txt").write_text("no error")
            except hf.DataError as e:
                (Path(out) / f"{case}{rank}.txt").write_text(str(e))
        torch.distributed.destroy_process_group()
        return
    if mode in ("fail-store", "fail-memory"):  # rank 1 hits a bad example mid-way: every rank must fail, none may hang
        if rank == 1:
            real = hf.Influence._features

            def failing(self, view, names, batch, calls=[]):  # noqa: B006
                calls.append(1)
                if len(calls) == 2:
                    raise FloatingPointError("simulated non-finite gradient")
                return real(self, view, names, batch)

            hf.Influence._features = failing
        kw = {"store": Path(out) / "store"} if mode == "fail-store" else {}
        try:
            hf.Influence(task, **setup.kwargs, **kw).fit(train)
        except (FloatingPointError, hf.distributed.RankFailedError) as e:
            (Path(out) / f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        torch.distributed.destroy_process_group()
        return
    kw = {**setup.kwargs, "hessian": "fisher"} if mode == "fisher" else setup.kwargs  # "equal" or "fisher"
    store = hf.Influence(task, **kw, store=Path(out) / "store").fit(train)
    memory = hf.Influence(task, **kw).fit(train)
    res = {f"store_{k}": v for k, v in results(store, target, test).items()}
    res.update({f"memory_{k}": v for k, v in results(memory, target, test).items()})
    np.savez(Path(out) / f"rank{rank}.npz", **res)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "equal")
