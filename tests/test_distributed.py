"""Two gloo processes under torchrun give the same scores as one process."""

from __future__ import annotations

import os
import subprocess
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
    return hf.ClassificationTask(model), (x, y), target, test


setup.kwargs = dict(members=hf.members.Dropout(n=2, p_max=0.3), projection=hf.projections.Factorized(20), batch_size=16)


def results(est, target, test) -> dict[str, np.ndarray]:
    top = est.top_k(test, 5)
    return {
        "influence": est.influence(target, reduce=None),
        "pairwise": est.pairwise(test),
        "self": est.self_influence(),
        "top_idx": top.indices,
        "top_scores": top.scores,
    }


def torchrun(out: Path, mode: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).parent / "dist_worker.py"), str(out), mode,
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_two_gloo_processes_equal_one_process(tmp_path):
    torchrun(tmp_path, "equal")
    task, train, target, test = setup()
    single = results(hf.Influence(task, **setup.kwargs).fit(train), target, test)
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for where in ("store", "memory"):
            for key, want in single.items():
                np.testing.assert_allclose(got[f"{where}_{key}"], want, rtol=1e-5, atol=1e-6, err_msg=f"{where} {key}")
                assert got[f"{where}_{key}"].dtype == want.dtype, (where, key)  # pairwise, top_k: float32
                assert got[f"{where}_{key}"].flags.f_contiguous == want.flags.f_contiguous, (where, key)
    # every rank wrote its share of the shared store
    assert sorted(p.name for p in (tmp_path / "store" / "progress").iterdir()) == [
        f"m{m}.r{r}.json" for m in range(2) for r in range(2)
    ]


def test_data_that_differ_between_ranks_fail_every_rank(tmp_path):
    """Training data (with and without a store, or of another length), test data and target
    data that differ on rank 1: a named DataError on both ranks, before any sum mixes them."""
    torchrun(tmp_path, "mismatch")
    for case, what in [("store", "training data"), ("memory", "training data"), ("length", "training data"),
                       ("test", "test data"), ("top_k", "test data"), ("target", "target data")]:  # fmt: skip
        assert f"rank 1 was given different {what} than rank 0" in (tmp_path / f"{case}1.txt").read_text(), case
        assert f"another rank (rank 1) was given different {what}" in (tmp_path / f"{case}0.txt").read_text(), case


def test_a_failure_mid_way_on_one_rank_fails_every_rank(tmp_path):
    for mode in ("fail-store", "fail-memory"):
        out = tmp_path / mode
        out.mkdir()
        torchrun(out, mode)  # returns: no rank hangs (torchrun would time out)
        assert "simulated non-finite gradient" in (out / "error1.txt").read_text()
        text = (out / "error0.txt").read_text()
        assert text.startswith("RankFailedError") and "simulated non-finite gradient" in text, text
