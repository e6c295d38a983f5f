"""The engine choice, the check against the per-example loop, the model fingerprint
after fit, and member averaging with projection seeds."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfree as hf
from hessfree.projections import Dense, Factorized


def loop_features(model, task, data, names):
    """Per-example gradients by a plain autograd loop, flat in ``names`` order."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(data[0])):
        loss = task.per_example_loss(model, tuple(t[i : i + 1] for t in data)).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(params[n])).reshape(-1) for g, n in zip(grads, names)]))
    return torch.stack(rows)


class FunctionalUse(nn.Module):
    """``lin.weight`` is used by ``lin`` and again outside it (``F.linear``): a hook
    on ``lin`` sees only the first use."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(F.linear(h, self.lin.weight))


class Attention(nn.Module):
    """nn.MultiheadAttention calls its out_proj weight functionally, never through out_proj's forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def _data(model_kind):
    g = torch.Generator().manual_seed(0)
    if model_kind == "functional":
        return FunctionalUse(), (torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g))
    return Attention(), (torch.randn(6, 5, 3, generator=g), torch.randint(0, 2, (6,), generator=g))


@pytest.mark.parametrize("kind", ["functional", "attention"])
def test_a_weight_used_outside_its_layer_goes_to_the_loop_under_auto_and_is_refused_by_hooks(kind):
    torch.manual_seed(0)
    model, data = _data(kind)
    model.eval()
    task = hf.ClassificationTask(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = hf.Influence(task, params="all", batch_size=4).fit(data)
    announced = [str(w.message) for w in caught if "hessfree" in str(w.message)]
    assert len(announced) == 1 and "backward pass per example" in announced[0]
    ref = loop_features(model, task, data, est.param_names(0))
    torch.testing.assert_close(est.features(data).double(), ref.double(), rtol=1e-4, atol=1e-6)
    with pytest.raises(hf.EngineError, match="engine='auto'"):
        hf.Influence(task, params="all", engine="hooks", batch_size=4).fit(data)


def test_a_layer_without_a_rule_is_named_once_with_its_cost():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)).eval()
    data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    task = hf.ClassificationTask(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = hf.Influence(task, members=hf.members.WeightNoise(n=3, sigma=0.01), batch_size=2).fit(data)
    announced = [str(w.message) for w in caught if "hessfree" in str(w.message)]
    assert len(announced) == 1, announced  # once, not once per member
    assert "'1' (PReLU)" in announced[0]
    assert est.features(data).shape == (5, sum(p.numel() for p in model.parameters()))


def test_vmap_refusal_is_a_named_error_and_the_loop_is_the_reference():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(16, 2)

        def forward(self, x):
            buf = torch.zeros(x.shape[0], 16)
            buf[:, :8] = self.a(x)
            return self.b(buf)

    torch.manual_seed(0)
    model = InPlace().eval()
    data = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    task = hf.ClassificationTask(model)
    with pytest.raises(hf.EngineError, match="engine='vmap' cannot run this model"):
        hf.Influence(task, engine="vmap").fit(data)
    ref = loop_features(model, task, data, [n for n, _ in model.named_parameters()])
    for engine in ("auto", "hooks", "loop"):
        est = hf.Influence(task, engine=engine, batch_size=4).fit(data)
        torch.testing.assert_close(est.features(data), ref, rtol=1e-4, atol=1e-6)


def test_unknown_engine_is_refused():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="engine must be one of"):
        hf.Influence(hf.ClassificationTask(model), engine="fast")


def _fitted(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).eval()
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g))
    return model, data, hf.Influence(hf.ClassificationTask(model), **kw).fit(data)


@pytest.mark.parametrize(
    "edit",
    ["no_grad_inplace", "data_write", "optimizer_step", "replaced_tensor", "buffer"],
)
def test_a_model_changed_after_fit_raises_instead_of_stale_scores(edit):
    model, data, est = _fitted()
    before = est.self_influence()
    if edit == "no_grad_inplace":
        with torch.no_grad():
            model[0].weight[0, 0] += 0.5
    elif edit == "data_write":
        model[3].bias.data[1] = 3.0
    elif edit == "optimizer_step":
        model.train()
        loss = F.cross_entropy(model(data[0]), data[1])
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.eval()
    elif edit == "replaced_tensor":
        model[3].weight = nn.Parameter(model[3].weight.detach() * 2)
    else:
        model[1].running_mean.add_(1.0)
    with pytest.raises(hf.ModelChangedError, match="call est.fit"):
        est.self_influence()
    # refitting describes the new model
    est.fit(data)
    assert not np.allclose(est.self_influence(), before)


def test_an_unchanged_model_is_not_flagged():
    model, data, est = _fitted()
    model.eval()  # a mode switch is not a change of parameters
    with torch.no_grad():
        model(data[0])
    np.testing.assert_allclose(est.self_influence(), est.self_influence())


@pytest.mark.parametrize("projection", ["dense", "factorized"])
def test_mean_over_members_ignores_projection_seeds(projection):
    """With S projection seeds, "mean" averages over the user's members only; each
    result equals the average of S single-seed estimators (computed separately)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))
    test = (torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g))
    make = (lambda s: Dense(16, seed=s)) if projection == "dense" else (lambda s: Factorized(16, seed=s))
    task = hf.ClassificationTask(models[0])
    target = hf.targets.Utility(test)
    for members in (None, hf.members.Models(models)):
        n_user = 1 if members is None else 2
        multi = hf.Influence(task, members, projection=[make(s) for s in range(4)]).fit(train)
        singles = [hf.Influence(task, members, projection=make(s)).fit(train) for s in range(4)]
        for call in (lambda e, r: e.influence(target, reduce=r), lambda e, r: e.pairwise(test, reduce=r),
                     lambda e, r: e.self_influence(reduce=r)):  # fmt: skip
            seed_average = np.mean([call(e, "sum") for e in singles], axis=0)
            np.testing.assert_allclose(call(multi, "sum"), seed_average, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(call(multi, "mean"), seed_average / n_user, rtol=1e-5, atol=1e-9)
