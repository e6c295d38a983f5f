"""hessian="fisher": the damped empirical Fisher of the (projected) training features,
checked against a numpy closed form built from a plain per-example autograd loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfree as hf

N, D_IN, C = 48, 5, 3


def _data(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    return x, y


def _mlp(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 4), nn.Tanh(), nn.Linear(4, C)).double()


def _per_example_grads(model, x, y) -> np.ndarray:
    """(n, D) flat per-example gradients of the cross-entropy, one backward per example."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    model.zero_grad()
    return torch.stack(rows).numpy()


def _mean_loss_grad(model, x, y) -> np.ndarray:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone().numpy()
    model.zero_grad()
    return g


def _fisher(phi: np.ndarray, damping=None, ratio=0.1):
    """Phi^T Phi / n + lambda I with the documented default rule."""
    n, k = phi.shape
    f = phi.T @ phi / n
    lam = ratio * np.trace(f) / k if damping is None else damping
    return f + lam * np.eye(k), lam


def _project(est, member, g: np.ndarray) -> np.ndarray:
    return est.feature_map(member).project_flat(torch.from_numpy(g).float()).double().numpy()


def test_exact_features_match_numpy_closed_form():
    model = _mlp()
    x, y = _data()
    xv, yv = _data(seed=5, n=10)
    xt, yt = _data(seed=6, n=7)
    est = hf.Influence(hf.ClassificationTask(model), hessian="fisher", batch_size=16, progress=False).fit((x, y))
    phi = _per_example_grads(model, x, y)
    fisher, lam = _fisher(phi)
    q = np.linalg.solve(fisher, _mean_loss_grad(model, xv, yv))
    np.testing.assert_allclose(est.influence(hf.targets.Utility((xv, yv))), phi @ q, rtol=1e-6, atol=1e-10)
    rep = est.hessian_report_["model"]
    assert rep["damping"] == pytest.approx(lam, rel=1e-10)
    assert rep["dim"] == phi.shape[1] and rep["n"] == N
    evals = np.linalg.eigvalsh(phi.T @ phi / N)
    assert rep["max_eigenvalue"] == pytest.approx(evals[-1], rel=1e-8)
    assert rep["condition_number"] == pytest.approx((evals[-1] + lam) / (evals[0] + lam), rel=1e-6)

    phit = _per_example_grads(model, xt, yt)
    expected = phit @ np.linalg.solve(fisher, phi.T)  # (n_test, n_train)
    np.testing.assert_allclose(est.pairwise((xt, yt)), expected, rtol=1e-6, atol=1e-10)
    top = est.top_k((xt, yt), 4)
    np.testing.assert_array_equal(top.indices, np.argsort(-expected, axis=1)[:, :4])
    np.testing.assert_allclose(top.scores, np.sort(expected, axis=1)[:, ::-1][:, :4], rtol=1e-5)
    expected_self = np.einsum("ij,ji->i", phi, np.linalg.solve(fisher, phi.T))
    np.testing.assert_allclose(est.self_influence(), expected_self, rtol=1e-6)


def test_projection_ensemble_memory_and_store_equal_closed_form(tmp_path):
    models = [_mlp(1), _mlp(2)]
    x, y = _data()
    xv, yv = _data(seed=5, n=10)
    xt, yt = _data(seed=6, n=7)
    task = hf.ClassificationTask(models[0])
    kw = dict(members=hf.members.Models(models), projection=hf.projections.Dense(12), hessian="fisher",
              batch_size=16, progress=False)
    mem = hf.Influence(task, **kw).fit((x, y))
    disk = hf.Influence(task, store=tmp_path / "s", **kw).fit((x, y))
    target = hf.targets.Utility((xv, yv))
    inf, pw, si = np.zeros((2, N)), np.zeros((2, 7, N)), np.zeros((2, N))
    for m, model in enumerate(models):
        phi = _project(mem, m, _per_example_grads(model, x, y))
        fisher, lam = _fisher(phi)
        assert mem.hessian_report_[f"model{m}"]["damping"] == pytest.approx(lam, rel=1e-5)
        inf[m] = phi @ np.linalg.solve(fisher, _project(mem, m, _mean_loss_grad(model, xv, yv)))
        pw[m] = _project(mem, m, _per_example_grads(model, xt, yt)) @ np.linalg.solve(fisher, phi.T)
        si[m] = np.einsum("ij,ji->i", phi, np.linalg.solve(fisher, phi.T))
    for est in (mem, disk):
        np.testing.assert_allclose(est.influence(target, reduce=None), inf, rtol=2e-4, atol=1e-6 * np.abs(inf).max())
        np.testing.assert_allclose(est.pairwise((xt, yt), reduce=None), pw, rtol=2e-4, atol=1e-6 * np.abs(pw).max())
        np.testing.assert_allclose(est.self_influence(reduce=None), si, rtol=2e-4)
    # memory and disk: the same features, the same factorization, the same numbers
    np.testing.assert_array_equal(disk.influence(target), mem.influence(target))
    np.testing.assert_array_equal(disk.top_k((xt, yt), 5).indices, mem.top_k((xt, yt), 5).indices)
    np.testing.assert_allclose(disk.top_k((xt, yt), 5).scores, np.sort(pw.sum(0), 1)[:, ::-1][:, :5], rtol=2e-4)
    # a reopened store (no training data) factorizes again and gives the same numbers
    again = hf.Influence(task, store=tmp_path / "s", **kw).fit()
    np.testing.assert_array_equal(again.influence(target), mem.influence(target))
    assert again.hessian_report_["model1"]["damping"] == mem.hessian_report_["model1"]["damping"]


def test_given_damping_and_factorized_projection():
    model = _mlp()
    x, y = _data()
    xv, yv = _data(seed=5, n=10)
    est = hf.Influence(hf.ClassificationTask(model), projection=hf.projections.Factorized(8), hessian="fisher",
                       damping=0.3, progress=False).fit((x, y))
    phi = _project(est, 0, _per_example_grads(model, x, y))
    fisher, _ = _fisher(phi, damping=0.3)
    expected = phi @ np.linalg.solve(fisher, _project(est, 0, _mean_loss_grad(model, xv, yv)))
    np.testing.assert_allclose(est.influence(hf.targets.Utility((xv, yv))), expected, rtol=2e-4)
    rep = est.hessian_report_["model"]
    assert rep["damping"] == 0.3 and rep["damping_rule"] == "given"
    (g, q), = est.target_directions(hf.targets.Utility((xv, yv)))
    np.testing.assert_allclose(q, np.linalg.solve(fisher, g), rtol=1e-4)


def test_least_squares_with_unit_residuals_equals_exact_hessian():
    """Linear model, loss r^2: g_i = 2 r_i [x_i, 1] and H = (2/n) sum [x_i,1][x_i,1]^T, so with
    r_i^2 = 1/2 for every i the empirical Fisher IS the Hessian, and the scores coincide."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 1).double()
    with torch.no_grad():
        pred = model(x).reshape(-1)
    signs = torch.where(torch.rand(30, generator=g) < 0.5, -1.0, 1.0).double()
    y = (pred + signs / np.sqrt(2)).reshape(-1, 1)
    xv = torch.randn(6, 4, generator=g, dtype=torch.float64)
    yv = torch.randn(6, 1, generator=g, dtype=torch.float64)
    task = hf.RegressionTask(model)
    target = hf.targets.Utility((xv, yv))
    fisher = hf.Influence(task, hessian="fisher", damping=0.01, progress=False).fit((x, y)).influence(target)
    exact = hf.Influence(task, hessian="exact", damping=0.01, progress=False).fit((x, y)).influence(target)
    np.testing.assert_allclose(fisher, exact, rtol=1e-6)
    # with other residuals the empirical Fisher differs from the Hessian (the check above can fail)
    y2 = (pred + 2 * signs).reshape(-1, 1)
    f2 = hf.Influence(task, hessian="fisher", damping=0.01, progress=False).fit((x, y2)).influence(target)
    e2 = hf.Influence(task, hessian="exact", damping=0.01, progress=False).fit((x, y2)).influence(target)
    assert not np.allclose(f2, e2, rtol=1e-2)


def test_refusals(monkeypatch):
    model = _mlp()
    x, y = _data()
    task = hf.ClassificationTask(model)
    with monkeypatch.context() as mp:  # refused before any gradient is computed
        mp.setattr(hf.Influence, "_features", lambda *a: pytest.fail("features computed before the refusal"))
        with pytest.raises(ValueError, match=r"k=39.*Factorized"):
            hf.Influence(task, hessian="fisher", hessian_options={"max_dim": 20}, progress=False).fit((x, y))
    with pytest.raises(ValueError, match="damping"):
        hf.Influence(task, hessian="fisher", damping=-1.0)
    with pytest.raises(ValueError, match="damping_ratio"):
        hf.Influence(task, hessian="fisher", hessian_options={"damping_ratio": 0})
    # 10 examples, 39 features, no damping: Phi^T Phi / n is singular
    with pytest.raises(ValueError, match="not positive definite; pass a larger damping"):
        hf.Influence(task, hessian="fisher", damping=0.0, progress=False).fit((x[:10], y[:10]))
    for bad in (-5, 2.5, True):
        with pytest.raises(ValueError, match="eig_max_dim must be an integer >= 0"):
            hf.Influence(task, hessian="fisher", hessian_options={"eig_max_dim": bad})
    # the parameter-space comparators still refuse projections and stores, and point to fisher
    with pytest.raises(ValueError, match="hessian='fisher'"):
        hf.Influence(task, hessian="cg", projection=hf.projections.Dense(8))


def test_damping_rule_scales_with_the_features():
    """Doubling the loss doubles every feature: the default damping scales by 4, the
    Fisher by 4 and the scores (phi^T F^{-1} q) stay the same."""
    model = _mlp()
    x, y = _data()
    xv, yv = _data(seed=5, n=10)

    class Doubled(hf.ClassificationTask):
        def loss(self, outputs, batch):
            return 2 * super().loss(outputs, batch)

    a = hf.Influence(hf.ClassificationTask(model), hessian="fisher", progress=False).fit((x, y))
    b = hf.Influence(Doubled(model), hessian="fisher", progress=False).fit((x, y))
    t = hf.targets.Utility((xv, yv))
    sa, sb = a.influence(t), b.influence(t)
    assert b.hessian_report_["model"]["damping"] == pytest.approx(4 * a.hessian_report_["model"]["damping"])
    np.testing.assert_allclose(sb, 2 * sa * 2 / 4, rtol=1e-6)  # target doubled too: 2 * 2 / 4


def test_two_gloo_processes_equal_one_process(tmp_path):
    from test_distributed import results, setup, torchrun

    torchrun(tmp_path, "fisher")  # tests/dist_worker.py with hessian="fisher"
    task, train, target, test = setup()
    single = results(hf.Influence(task, **setup.kwargs, hessian="fisher").fit(train), target, test)
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for where in ("store", "memory"):
            for key, want in single.items():
                np.testing.assert_allclose(got[f"{where}_{key}"], want, rtol=1e-5, atol=1e-6, err_msg=f"{where} {key}")


def test_report_above_eig_max_dim_uses_cheap_estimates():
    model = _mlp()
    x, y = _data()
    est = hf.Influence(hf.ClassificationTask(model), hessian="fisher", hessian_options={"eig_max_dim": 10},
                       progress=False).fit((x, y))
    rep = est.hessian_report_["model"]
    phi = _per_example_grads(model, x, y)
    fisher, lam = _fisher(phi)
    evals = np.linalg.eigvalsh(fisher)
    assert rep["eigenvalues"].startswith("largest by Lanczos")
    assert rep["max_eigenvalue"] == pytest.approx(evals[-1] - lam, rel=1e-5)
    assert rep["min_eigenvalue"] is None and rep["condition_number"] is None
    assert rep["condition_number_bound"] == pytest.approx(evals[-1] / lam, rel=1e-5)
    assert rep["condition_number_bound"] >= evals[-1] / evals[0] * (1 - 1e-6)  # equal: softmax gradients leave a null direction
    assert set(rep["seconds"]) == {"gram", "cholesky", "report"}


def test_report_of_one_or_two_features_is_exact_whatever_eig_max_dim():
    model = _mlp()
    x, y = _data()
    for k in (1, 2):
        est = hf.Influence(hf.ClassificationTask(model), projection=hf.projections.Dense(k), hessian="fisher",
                           hessian_options={"eig_max_dim": 0}, progress=False).fit((x, y))
        phi = est.features((x, y)).double().numpy()
        evals = np.linalg.eigvalsh(phi.T @ phi / len(phi))
        rep = est.hessian_report_["model"]
        assert rep["eigenvalues"] == "eigh" and rep["dim"] == k
        assert rep["min_eigenvalue"] == pytest.approx(evals[0], rel=1e-6, abs=1e-12)
        assert rep["max_eigenvalue"] == pytest.approx(evals[-1], rel=1e-6)


def test_sample_weights_enter_the_fisher_once(tmp_path):
    """Objective (1/n) sum_i w_i l_i: F = (1/n) sum_i w_i g_i g_i^T + lambda I, features w_j g_j
    (an example of weight 0 adds nothing); a uniform weight c leaves the scores unchanged."""
    model = _mlp()
    x, y = _data()
    xt, yt = _data(seed=5, n=6)
    w = torch.rand(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    w[7] = 0.0
    G = _per_example_grads(model, x, y)  # unweighted g_i
    Q = _per_example_grads(model, xt, yt)
    wn = w.numpy()
    f = (G * wn[:, None]).T @ G / N
    lam = 0.1 * np.trace(f) / f.shape[0]
    want = Q @ np.linalg.solve(f + lam * np.eye(f.shape[0]), (G * wn[:, None]).T)
    task = hf.ClassificationTask(model)
    est = hf.Influence(task, hessian="fisher", batch_size=10).fit((x, y, w))
    np.testing.assert_allclose(est.pairwise((xt, yt)), want, rtol=1e-9, atol=1e-12)
    from torch.utils.data import DataLoader

    rows = [(x[i], y[i], w[i]) for i in range(N)]  # weights read batch by batch from a loader, and a store
    loaded = hf.Influence(task, hessian="fisher", batch_size=10, store=tmp_path / "s").fit(DataLoader(rows, batch_size=10))
    np.testing.assert_allclose(loaded.pairwise((xt, yt)), want, rtol=1e-5, atol=1e-6)  # features stored in float32
    reopened = hf.Influence(task, hessian="fisher", batch_size=10, store=tmp_path / "s")
    with pytest.raises(ValueError, match="stored training data have sample weights.*est.fit\\(train\\)"):
        reopened.fit()
    for c in (2.0, 0.25):
        scaled = hf.Influence(task, hessian="fisher", batch_size=10).fit((x, y, torch.full((N,), c, dtype=torch.float64)))
        plain = hf.Influence(task, hessian="fisher", batch_size=10).fit((x, y))
        np.testing.assert_allclose(scaled.pairwise((xt, yt)), plain.pairwise((xt, yt)), rtol=1e-9)
    w[3] = -1.0
    with pytest.raises(ValueError, match="training example 3 has sample weight -1; the empirical Fisher"):
        hf.Influence(task, hessian="fisher", batch_size=10).fit((x, y, w))
