"""Hessian comparators against an explicit Hessian built here with torch.autograd.functional."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

import hessfree as hf

N, LAM = 40, 0.05


def _data(seed=0, n=N, d=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = ((x[:, 0] - 0.7 * x[:, 1] + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)) > 0).long()
    return x, y


def _fit_logreg(x, y, lam=LAM, keep=None):
    """L2-regularised logistic regression trained to the optimum (LBFGS, float64)."""
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1).double()
    idx = torch.arange(x.shape[0]) if keep is None else torch.as_tensor(keep)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logit = model(x[idx]).reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logit, y[idx].double())
        loss = loss + 0.5 * lam * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _flat_fn(model, fn):
    """fn(model-like callable) as a function of the flat parameter vector."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def of_flat(theta):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes))))
        return fn(lambda *a: torch.func.functional_call(model, parts, a))

    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return of_flat, theta0


def _loss(out, y):
    if out.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(out.reshape(-1), y.double(), reduction="none")
    return F.cross_entropy(out, y, reduction="none")


def _explicit(model, x, y, lam):
    """(H + lam I) of the mean training loss, and per-example gradients (n, D) by an autograd loop."""
    mean_loss, theta0 = _flat_fn(model, lambda m: _loss(m(x), y).mean())
    h = torch.autograd.functional.hessian(mean_loss, theta0) + lam * torch.eye(theta0.numel(), dtype=torch.float64)
    rows = []
    for i in range(x.shape[0]):
        one, _ = _flat_fn(model, lambda m, i=i: _loss(m(x[i : i + 1]), y[i : i + 1]).sum())
        rows.append(torch.autograd.functional.jacobian(one, theta0))
    return h, torch.stack(rows)


def _grad(model, fn):
    f, theta0 = _flat_fn(model, fn)
    return torch.autograd.functional.jacobian(f, theta0)


def _scores(model, x, y, target, method, lam=LAM, batch_size=16, **options):
    est = hf.Influence(hf.ClassificationTask(model), hessian=method, damping=lam, hessian_options=options or None,
                       batch_size=batch_size, progress=False).fit((x, y))
    return est, est.influence(target)


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_exact_matches_explicit_hessian_utility(kind):
    x, y = _data()
    model = _fit_logreg(x, y) if kind == "logreg" else _mlp()
    xv, yv = _data(seed=5, n=15)
    h, g = _explicit(model, x, y, LAM)
    gf = _grad(model, lambda m: _loss(m(xv), yv).mean())
    expected = (g @ torch.linalg.solve(h, gf)).numpy()
    est, got = _scores(model, x, y, hf.targets.Utility((xv, yv)), "exact")
    # a float64 model keeps float64 through the solve (it was rounded to float32 there)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    rep = est.hessian_report_["model"]
    assert rep["dim"] == g.shape[1]
    assert rep["min_eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(h)[0]) - LAM, abs=1e-6)


def test_exact_fairness_robustness_custom_targets():
    x, y = _data()
    model = _fit_logreg(x, y)
    xv, yv = _data(seed=7, n=30)
    groups = (torch.arange(30) % 2).numpy()
    h, g = _explicit(model, x, y, LAM)
    hinv_g = lambda gf: (g @ torch.linalg.solve(h, gf)).numpy()  # noqa: E731

    def dp(m):
        p = torch.sigmoid(m(xv).reshape(-1))
        return (p[groups == 0].mean() - p[groups == 1].mean()).abs()

    w, b = model.weight.detach().reshape(-1), model.bias.detach()
    margin = xv @ w + b
    x_adv = xv - (1.3 * margin / w.pow(2).sum())[:, None] * w[None]
    right = (margin > 0) == (yv == 1)  # only correctly classified points are attacked
    x_adv = torch.where(right[:, None], x_adv, xv)

    cases = [
        (hf.targets.DemographicParity((xv, yv), groups=groups), dp),
        (hf.targets.Robustness((xv, yv), attack=hf.attacks.LinearMinimal(0.3)), lambda m: _loss(m(x_adv), yv).mean()),
        (hf.targets.Custom(lambda m, batch: m(batch[0]).pow(2).mean(), (xv, yv)), lambda m: m(xv).pow(2).mean()),
    ]
    for target, fn in cases:
        _, got = _scores(model, x, y, target, "exact")
        expected = hinv_g(_grad(model, fn))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7 * np.abs(expected).max(), err_msg=target.name)


def test_pairwise_and_self_influence_exact():
    x, y = _data()
    model = _mlp()
    h, g = _explicit(model, x, y, LAM)
    xt, yt = _data(seed=3, n=5)
    _, gt = _explicit(model, xt, yt, LAM)
    est = hf.Influence(hf.ClassificationTask(model), hessian="exact", damping=LAM, progress=False).fit((x, y))
    hinv = torch.linalg.inv(h)
    np.testing.assert_allclose(est.pairwise((xt, yt)), (gt @ hinv @ g.T).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(est.self_influence(), ((g @ hinv) * g).sum(1).numpy(), rtol=1e-4)


def test_cg_and_lissa_within_reported_tolerance():
    """||x - x*|| <= ||A^-1|| * residual * ||b||, so each score is off by at most ||g_i|| times that."""
    x, y = _data()
    model = _fit_logreg(x, y)
    xv, yv = _data(seed=5, n=15)
    h, g = _explicit(model, x, y, LAM)
    gf = _grad(model, lambda m: _loss(m(xv), yv).mean())
    expected = (g @ torch.linalg.solve(h, gf)).numpy()
    inv_norm = 1.0 / float(torch.linalg.eigvalsh(h)[0])
    target = hf.targets.Utility((xv, yv))
    float32_slack = 1e-6 * np.abs(expected).max()  # features and scores are float32
    for method, tol, opts in [("cg", 1e-2, {}), ("cg", 1e-7, {}), ("lissa", 1e-2, {"iterations": 5000}),
                              ("lissa", 1e-6, {"iterations": 5000}), ("lissa", 1e-3, {"iterations": 5000, "scale": 2.0})]:
        est, got = _scores(model, x, y, target, method, tol=tol, **opts)
        rep = est.hessian_report_["model"]
        assert rep["converged"] and rep["relative_residual"] <= tol, rep
        bound = g.norm(dim=1).numpy() * inv_norm * rep["relative_residual"] * float(gf.norm()) + float32_slack
        assert np.all(np.abs(got - expected) <= bound), (method, np.abs(got - expected).max(), bound.min())
        if tol < 1e-5:
            assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_lissa_reports_non_convergence():
    x, y = _data()
    model = _fit_logreg(x, y)
    target = hf.targets.Utility(_data(seed=5, n=15))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        est, _ = _scores(model, x, y, target, "lissa", iterations=3)
    assert not est.hessian_report_["model"]["converged"]
    assert est.hessian_report_["model"]["iterations"] == 3


def test_cg_and_lissa_pairwise_and_mlp():
    x, y = _data()
    model = _mlp()
    h0, g = _explicit(model, x, y, 0.0)
    lam = 1.0 - min(0.0, float(torch.linalg.eigvalsh(h0)[0]))  # H + lam I positive definite
    h = h0 + lam * torch.eye(h0.shape[0], dtype=torch.float64)
    xt, yt = _data(seed=3, n=4)
    _, gt = _explicit(model, xt, yt, 0.0)
    expected = (gt @ torch.linalg.inv(h) @ g.T).numpy()
    for method, opts in [("cg", {"tol": 1e-9, "max_iter": 100}), ("lissa", {"tol": 1e-7, "iterations": 3000})]:
        est = hf.Influence(hf.ClassificationTask(model), hessian=method, damping=lam, hessian_options=opts,
                           progress=False).fit((x, y))
        np.testing.assert_allclose(est.pairwise((xt, yt)), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
        assert est.hessian_report_["model"]["rows"] == 4


@pytest.mark.parametrize("weighted", [False, True])
def test_datainf_matches_its_closed_form(weighted):
    """Per layer, the average of the rank-one inverses of w_i g_i g_i^T + lam I (w = 1 unweighted);
    the scores use the weighted features w_j g_j."""
    x, y = _data()
    model = _mlp()
    _, g = _explicit(model, x, y, 0.0)
    w = torch.rand(len(y), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 if weighted else None
    wv = torch.ones(len(y), dtype=torch.float64) if w is None else w
    xv, yv = _data(seed=5, n=15)
    gf = _grad(model, lambda m: _loss(m(xv), yv).mean())
    # layers: [0.weight, 0.bias] and [2.weight, 2.bias]; the paper's damping rule per layer.
    expected_q = torch.empty_like(gf)
    for sl in (slice(0, 12), slice(12, 22)):
        gl, v = g[:, sl], gf[sl]
        lam = 0.1 * (wv * gl.pow(2).sum(1)).mean() / gl.shape[1]
        terms = [(v - wi * (gi @ v) / (lam + wi * (gi @ gi)) * gi) / lam for gi, wi in zip(gl, wv)]
        expected_q[sl] = torch.stack(terms).mean(0)
    data = (x, y) if w is None else (x, y, w)
    est = hf.Influence(hf.ClassificationTask(model), hessian="datainf", batch_size=16, progress=False).fit(data)
    want = ((g * wv[:, None]) @ expected_q).numpy()
    np.testing.assert_allclose(est.influence(hf.targets.Utility((xv, yv))), want, rtol=1e-4)
    assert est.hessian_report_["model"]["layers"] == ["0", "2"]


def test_datainf_is_exact_for_one_example():
    """With n = 1 the damped Fisher g g^T + lam I is inverted exactly by Sherman-Morrison."""
    x, y = _data(n=1)
    model = _mlp()
    _, g = _explicit(model, x, y, 0.0)
    est = hf.Influence(hf.ClassificationTask(model), params="2", hessian="datainf", damping=0.3,
                       progress=False).fit((x, y))
    xt, yt = _data(seed=3, n=3)
    _, gt = _explicit(model, xt, yt, 0.0)
    gl, gtl = g[:, 12:], gt[:, 12:]
    fisher = gl.T @ gl + 0.3 * torch.eye(10, dtype=torch.float64)
    np.testing.assert_allclose(est.pairwise((xt, yt)), (gtl @ torch.linalg.solve(fisher, gl.T)).numpy(), rtol=1e-4)


def test_exact_influence_predicts_leave_one_out():
    """score_i / n ~= f(theta_-i) - f(theta): the scaling and the sign, checked by retraining."""
    x, y = _data(n=50)
    model = _fit_logreg(x, y)
    xv, yv = _data(seed=9, n=40)
    _, scores = _scores(model, x, y, hf.targets.Utility((xv, yv)), "exact")

    def f(m):
        with torch.no_grad():
            return float(_loss(m(xv), yv).mean())

    base = f(model)
    actual = np.array([f(_fit_logreg(x, y, keep=np.delete(np.arange(50), i))) - base for i in range(50)])
    assert spearmanr(scores / 50, actual)[0] > 0.95
    np.testing.assert_allclose(scores / 50, actual, atol=0.15 * np.abs(actual).max())


def test_members_each_get_their_own_hessian():
    x, y = _data()
    m1, m2 = _fit_logreg(x, y), _fit_logreg(x, y, lam=1.0)
    xv, yv = _data(seed=5, n=10)
    est = hf.Influence(hf.ClassificationTask(m1), members=hf.members.Models([m1, m2]), hessian="exact",
                       damping=LAM, progress=False).fit((x, y))
    rows = est.influence(hf.targets.Utility((xv, yv)), reduce=None)
    for r, m in zip(rows, (m1, m2)):
        h, g = _explicit(m, x, y, LAM)
        gf = _grad(m, lambda mm: _loss(mm(xv), yv).mean())
        np.testing.assert_allclose(r, (g @ torch.linalg.solve(h, gf)).numpy(), rtol=1e-4)
    assert set(est.hessian_report_) == {"model0", "model1"}


def test_bad_arguments_are_named():
    model = _mlp()
    task = hf.ClassificationTask(model)
    with pytest.raises(ValueError, match="hessian='newton'"):
        hf.Influence(task, hessian="newton")
    with pytest.raises(ValueError, match="damping"):
        hf.Influence(task, damping=0.1)
    with pytest.raises(ValueError, match="damping must be"):
        hf.Influence(task, hessian="exact", damping=-1.0)
    with pytest.raises(TypeError, match="hessian_options for 'cg'"):
        hf.Influence(task, hessian="cg", hessian_options={"iterations": 3})
    x, y = _data()
    est = hf.Influence(task, hessian="exact", hessian_options={"max_dim": 10}, progress=False)
    with pytest.raises(ValueError, match="22 x 22 Hessian"):  # when fit starts, before any gradient
        est.fit((x, y))
    for kw, match in [({"damping": True}, "damping must be a finite number >= 0, got True"),
                      ({"damping": "0.1"}, "damping must be a finite number >= 0, got '0.1'")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            hf.hessian.CG(**kw)
    with pytest.raises(ValueError, match="tol must be a finite number > 0, got -1"):
        hf.hessian.LiSSA(tol=-1)


def test_exact_refuses_a_hessian_singular_to_the_model_precision():
    """Two examples, 15 parameters: rank(H) <= 4, so H^-1 v at damping 0 is rounding noise."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    est = hf.Influence(hf.ClassificationTask(nn.Linear(4, 3)), hessian="exact", damping=0.0).fit((x, y))
    with pytest.raises(ValueError, match="singular to the model's precision.*pass damping > 0"):
        est.influence(hf.targets.Utility((x, y)))
    damped = hf.Influence(hf.ClassificationTask(est.task.model), hessian="exact", damping=0.01).fit((x, y))
    assert np.isfinite(damped.influence(hf.targets.Utility((x, y)))).all()  # the suggested fix works


def test_a_parameter_the_loss_does_not_reach_has_zero_curvature():
    """An unused parameter: exact / cg equal the closed form on the used ones (H's unused rows are 0)."""
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.spare = nn.Linear(2, 2).double(), nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x)

    x, y = _data(n=40)
    model = WithSpare()
    full = hf.Influence(hf.ClassificationTask(model), hessian="exact", damping=0.1).fit((x, y))
    used = hf.Influence(hf.ClassificationTask(model), params="lin", hessian="exact", damping=0.1).fit((x, y))
    target = hf.targets.Utility((x[:5], y[:5]))
    np.testing.assert_allclose(full.influence(target), used.influence(target), rtol=1e-10)
    cg = hf.Influence(hf.ClassificationTask(model), hessian="cg", damping=0.1).fit((x, y))
    np.testing.assert_allclose(cg.influence(target), used.influence(target), rtol=1e-6)


def test_target_directions_give_grad_and_solved_grad():
    x, y = _data()
    model = _fit_logreg(x, y)
    xv, yv = _data(seed=5, n=15)
    h, _ = _explicit(model, x, y, LAM)
    gf = _grad(model, lambda m: _loss(m(xv), yv).mean())
    est = hf.Influence(hf.ClassificationTask(model), hessian="exact", damping=LAM, progress=False).fit((x, y))
    ((g, q),) = hf.hessian.target_directions(est, hf.targets.Utility((xv, yv)))
    np.testing.assert_allclose(g, gf.numpy(), rtol=1e-5)
    np.testing.assert_allclose(q, torch.linalg.solve(h, gf).numpy(), rtol=1e-4)


def test_comparator_object_and_stochastic_lissa():
    """A comparator instance plugs in directly; minibatch LiSSA is seeded and close to exact."""
    x, y = _data()
    model = _fit_logreg(x, y)
    xv, yv = _data(seed=5, n=15)
    h, g = _explicit(model, x, y, LAM)
    expected = (g @ torch.linalg.solve(h, _grad(model, lambda m: _loss(m(xv), yv).mean()))).numpy()
    target = hf.targets.Utility((xv, yv))
    task = hf.ClassificationTask(model)
    cg = hf.Influence(task, hessian=hf.hessian.CG(damping=LAM, tol=1e-8), progress=False).fit((x, y))
    np.testing.assert_allclose(cg.influence(target), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    runs = []
    for _ in range(2):
        solver = hf.hessian.LiSSA(damping=LAM, iterations=300, scale=1.0, batch_size=10, repeats=4, seed=3)
        est = hf.Influence(task, hessian=solver, progress=False).fit((x, y))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs.append(est.influence(target))
        rep = est.hessian_report_["model"]
        said = [str(w.message) for w in caught if "did not converge" in str(w.message)]
        assert bool(said) == (not rep["converged"])  # a stochastic estimate off its tolerance warns too
        assert not said or "raise repeats or batch_size" in said[0]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert spearmanr(runs[0], expected)[0] > 0.95
    assert np.abs(runs[0] - expected).max() < 0.2 * np.abs(expected).max()
    with pytest.raises(ValueError, match="comparator object itself"):
        hf.Influence(task, hessian=hf.hessian.CG(), damping=0.1)
