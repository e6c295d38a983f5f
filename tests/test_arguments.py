"""InfluenceArguments: the estimator's options as a dataclass, saved beside every store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import hessfree as hf
from hessfree.arguments import InfluenceArguments


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    return hf.ClassificationTask(model), (x, y)


def test_round_trip_and_json():
    args = InfluenceArguments(members=hf.members.Dropout(n=2, p_max=0.2), projection=[hf.projections.Dense(8, seed=3)],
                              hessian=hf.hessian.EmpiricalFisher(damping=0.5), batch_size=32, store="/tmp/s")  # fmt: skip
    d = args.to_dict()
    assert json.loads(json.dumps(d)) == d
    back = InfluenceArguments.from_dict(d)
    assert back.to_dict() == d
    assert isinstance(back.hessian, hf.hessian.EmpiricalFisher) and back.hessian.damping == 0.5
    assert isinstance(back.projection[0], hf.projections.Dense) and back.projection[0].seed == 3
    with pytest.raises(ValueError, match="unknown Influence arguments"):
        InfluenceArguments.from_dict({**d, "lr": 1})
    with pytest.raises(ValueError, match="batch_size"):
        InfluenceArguments(batch_size=0)


def test_estimator_keeps_its_arguments():
    task, _ = _setup()
    est = hf.Influence(task, projection=hf.projections.Factorized(16), hessian="fisher", damping=0.1, batch_size=8)
    d = est.arguments.to_dict()
    assert d["hessian"] == "fisher" and d["damping"] == 0.1 and d["batch_size"] == 8
    assert d["projection"] == [hf.projections.Factorized(16).describe()]


def test_arguments_json_beside_the_store_is_written_and_checked(tmp_path):
    task, train = _setup()
    kw = dict(projection=hf.projections.Dense(8), batch_size=16, progress=False)
    est = hf.Influence(task, store=tmp_path / "s", **kw).fit(train)
    saved = json.loads((tmp_path / "s" / "arguments.json").read_text())
    assert saved == est.arguments.to_dict()
    # options the features do not depend on may change; the file follows the estimator in use
    again = hf.Influence(task, store=tmp_path / "s", hessian="fisher", **kw).fit()
    assert json.loads((tmp_path / "s" / "arguments.json").read_text())["hessian"] == "fisher"
    t = hf.targets.Utility(train)
    assert np.isfinite(again.influence(t)).all()
    # the ones they depend on are checked, naming the field
    bad = {**saved, "params": "last"}
    (tmp_path / "s" / "arguments.json").write_text(json.dumps(bad))
    with pytest.raises(hf.store.StoreMismatchError, match="params"):
        hf.Influence(task, store=tmp_path / "s", **kw).fit()
    with pytest.raises(hf.store.StoreMismatchError, match="params"):
        hf.Influence(task, store=tmp_path / "s", **kw).fit(train)
