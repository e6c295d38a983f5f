"""Integer options across the public API: numpy integers give the same result as
Python ints (and are saved as ints), while floats, bools and strings are refused
with the option's name before any work starts (a float size used to be rounded
down silently)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import hessfree as hf
from hessfree.hessian import CG, EmpiricalFisher, Exact, LiSSA


def _setup(n=24):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return hf.ClassificationTask(model), (x, y)


def test_numpy_integers_give_the_python_int_result(tmp_path):
    task, train = _setup()
    test = (train[0][:4], train[1][:4])
    ref = hf.Influence(task, batch_size=5, projection=hf.projections.Dense(6, seed=3)).fit(train)
    est = hf.Influence(task, batch_size=np.int64(5), projection=hf.projections.Dense(np.int32(6), seed=np.int64(3)),
                       store=tmp_path / "s")  # fmt: skip
    est.fit(train)
    np.testing.assert_allclose(est.pairwise(test), ref.pairwise(test), rtol=1e-6, atol=1e-7)
    top = est.top_k(test, np.int64(3))
    assert top.indices.shape == (4, 3)
    saved = json.loads((tmp_path / "s" / "arguments.json").read_text())
    assert saved["batch_size"] == 5 and type(est.arguments.batch_size) is int
    assert hf.projections.Dense(np.int64(6), seed=np.int64(3)).describe() == hf.projections.Dense(6, seed=3).describe()
    assert type(hf.projections.Factorized(np.int64(8)).dim) is int
    assert hf.members.Dropout(n=np.int64(2)).n == 2 and len(hf.members.Dropout(n=np.int64(2)).specs()) == 2
    k = (train[1] >= 0).sum() - 21  # a 0-d integer tensor, 3
    np.testing.assert_array_equal(est.top_k(test, k).indices, top.indices)
    assert hf.Influence(task, batch_size=torch.tensor(5)).arguments.batch_size == 5


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: hf.projections.Dense(8.0), "projection dim must be a positive integer, got 8.0"),
        (lambda: hf.projections.Factorized(True), "projection dim must be a positive integer, got True"),
        (lambda: hf.projections.Dense(torch.tensor(True)), "projection dim must be a positive integer, got tensor"),
        (lambda: hf.projections.Dense(8, seed=0.5), "projection seed must be an integer, got 0.5"),
        (lambda: hf.projections.Dense(8, block_rows=0), "block_rows must be a positive integer, got 0"),
        (lambda: hf.members.Dropout(n=2.5), "Dropout: n must be a positive integer, got 2.5"),
        (lambda: hf.members.WeightNoise(n="3"), "WeightNoise: n must be a positive integer, got '3'"),
        (lambda: hf.attacks.PGD(eps=0.1, steps=1.5), "PGD: steps must be a positive integer, got 1.5"),
        (lambda: CG(max_iter=10.0), "max_iter must be a positive integer, got 10.0"),
        (lambda: LiSSA(batch_size=0), r"batch_size must be a positive integer or None, got 0"),
        (lambda: Exact(chunk=2.0), "chunk must be a positive integer, got 2.0"),
        (lambda: EmpiricalFisher(max_dim=0), "max_dim must be a positive integer, got 0"),
    ],
)
def test_bad_integer_options_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_float_batch_size_is_refused_not_rounded():
    task, train = _setup()
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 2.5"):
        hf.Influence(task, batch_size=2.5)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 2.0"):
        hf.training.train(task.model, train, epochs=2.0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        hf.data.DataSource(train, batch_size=0)


@pytest.mark.parametrize("weights", [[float("nan"), 1.0], [1.0, -0.5], [float("inf"), 1.0]])
def test_model_weights_must_be_finite_and_non_negative(weights):
    task, _ = _setup()
    with pytest.raises(ValueError, match=r"Models: weight .* of model [01] is not a finite number >= 0"):
        hf.members.Models([task.model, task.model], weights=weights)
