"""Agreement metrics, leave-one-out and LDS harnesses against hand-computed and closed-form values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

import hessfree as hf
from hessfree import metrics


def test_pearson_spearman_by_hand_and_scipy():
    # by hand: x - mean = (-1, 0, 1), y - mean = (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 14/3)
    assert metrics.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / np.sqrt(2 * 14 / 3))
    assert metrics.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200)
    b[:50] = a[:50]
    ties = np.round(a * 2) / 2  # many ties
    assert metrics.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert metrics.spearman(ties, b) == pytest.approx(stats.spearmanr(ties, b)[0], abs=1e-12)


def test_sign_agreement_and_cosine_by_hand():
    assert metrics.sign_agreement([1, -1, 0, 2], [2, 1, 0, -1]) == pytest.approx(0.5)
    assert metrics.cosine([1, 0], [1, 1]) == pytest.approx(1 / np.sqrt(2))


def test_agreement_errors_name_the_problem():
    with pytest.raises(ValueError, match="lengths 3 and 2"):
        metrics.spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="second vector is constant"):
        metrics.pearson([1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.spearman([1, np.nan, 3], [1, 2, 3])


# ---- leave-one-out against ridge regression's closed form -------------------------------


def _ridge_problem(n=30, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    xt = rng.normal(size=(5, d))
    yt = xt @ rng.normal(size=d)
    return x, y, xt, yt


def _ridge(x, y, lam):
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def test_loo_matches_ridge_closed_form():
    """theta_-G = theta - A^-1 X_G^T (I - H_GG)^-1 e_G, A = X^T X + lam I, H = X A^-1 X^T."""
    x, y, xt, yt = _ridge_problem()
    lam = 0.7
    theta = _ridge(x, y, lam)
    a_inv = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    e = y - x @ theta

    def f(th):  # two targets at once: test MSE and the first test prediction
        return np.array([np.mean((xt @ th - yt) ** 2), xt[0] @ th])

    def theta_without(g):
        g = np.asarray(g)
        h_gg = x[g] @ a_inv @ x[g].T
        return theta - a_inv @ x[g].T @ np.linalg.solve(np.eye(len(g)) - h_gg, e[g])

    train_fn = lambda idx: _ridge(x[idx], y[idx], lam)  # noqa: E731
    got = metrics.loo(train_fn, f, 30, progress=False)
    expected = np.array([f(theta_without([i])) - f(theta) for i in range(30)])
    assert got.shape == (30, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)

    groups = [[0, 1, 2], [5, 9], [29]]
    got_g = metrics.loo(train_fn, lambda th: f(th)[0], 30, groups=groups, progress=False)
    np.testing.assert_allclose(got_g, [f(theta_without(g))[0] - f(theta)[0] for g in groups], rtol=1e-8)


def test_loo_uses_given_baseline_and_checks_groups():
    x, y, xt, yt = _ridge_problem()
    calls = []

    def train_fn(idx):
        calls.append(len(idx))
        return _ridge(x[idx], y[idx], 1.0)

    metrics.loo(train_fn, lambda th: float(th[0]), 30, groups=[[3]], baseline=0.0, progress=False)
    assert calls == [29]
    with pytest.raises(ValueError, match=r"indices in \[0, 30\)"):
        metrics.loo(train_fn, lambda th: 0.0, 30, groups=[[30]], progress=False)


# ---- LDS ----------------------------------------------------------------------------------


def _datamodel(n=40, k=3, seed=1):
    """A 'training' whose targets are exactly linear in the kept set: f_t(S) = -sum_{i in S} a[t, i]."""
    a = np.random.default_rng(seed).normal(size=(k, n))
    return a, (lambda idx: idx), (lambda idx: -a[:, idx].sum(1))


def test_subset_masks_sizes_and_seed():
    m = metrics.subset_masks(40, 10, alpha=0.5, seed=3)
    assert m.shape == (10, 40) and np.all(m.sum(1) == 20)
    assert np.array_equal(m, metrics.subset_masks(40, 10, alpha=0.5, seed=3))
    assert not np.array_equal(m, metrics.subset_masks(40, 10, alpha=0.5, seed=4))
    with pytest.raises(ValueError, match="alpha"):
        metrics.subset_masks(40, 10, alpha=1.0)


def test_lds_is_one_for_a_perfect_linear_datamodel_and_minus_one_reversed():
    a, train_fn, measure = _datamodel()
    res = metrics.lds(a, train_fn, measure, 40, n_subsets=20, progress=False)
    np.testing.assert_allclose(res.per_target, 1.0)
    assert metrics.lds(-a, train_fn, measure, 40, n_subsets=20, progress=False).mean == pytest.approx(-1.0)


def test_lds_score_matches_scipy():
    a, train_fn, measure = _datamodel()
    rng = np.random.default_rng(7)
    scores = a + rng.normal(scale=2.0, size=a.shape)  # a noisy attribution
    masks = metrics.subset_masks(40, 30, seed=2)
    outputs = np.stack([measure(np.flatnonzero(m)) for m in masks])
    res = metrics.lds_score(scores, masks, outputs)
    expected = [stats.spearmanr(masks @ scores[t], -outputs[:, t])[0] for t in range(3)]
    np.testing.assert_allclose(res.per_target, expected, atol=1e-12)
    assert res.mean == pytest.approx(np.mean(expected))


def test_lds_reproducible_and_resumable(tmp_path):
    x, y, xt, yt = _ridge_problem(n=40)
    theta = _ridge(x, y, 1.0)
    scores = np.random.default_rng(0).normal(size=40) + (x @ np.linalg.solve(x.T @ x + np.eye(4), xt[0]))
    measure = lambda th: float(xt[0] @ th)  # noqa: E731
    train_fn = lambda idx: _ridge(x[idx], y[idx], 1.0)  # noqa: E731
    first = metrics.lds(scores, train_fn, measure, 40, n_subsets=25, seed=5, progress=False)
    again = metrics.lds(scores, train_fn, measure, 40, n_subsets=25, seed=5, progress=False)
    assert round(first.mean, 3) == round(again.mean, 3)
    assert theta.shape == (4,)

    path = tmp_path / "lds.json"
    calls = {"n": 0}

    def flaky(idx):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return train_fn(idx)

    with pytest.raises(KeyboardInterrupt):
        metrics.lds(scores, flaky, measure, 40, n_subsets=25, seed=5, results_path=path, progress=False)
    saved = json.loads(path.read_text())
    assert len(saved["outputs"]) == 10 and saved["complete"] is False
    calls["n"] = 100
    resumed = metrics.lds(scores, flaky, measure, 40, n_subsets=25, seed=5, results_path=path, progress=False)
    assert calls["n"] == 116  # subset 0 again (to check the saved results), then the 15 missing subsets
    assert resumed.mean == first.mean
    assert json.loads(path.read_text())["complete"] is True
    with pytest.raises(ValueError, match="other subsets"):
        metrics.lds(scores, train_fn, measure, 40, n_subsets=25, seed=6, results_path=path, progress=False)
    other = lambda th: float(xt[1] @ th)  # noqa: E731 - another measure: the saved values are not reused
    with pytest.raises(ValueError, match="subset 0 no longer reproduces.*measure changed"):
        metrics.lds(scores, train_fn, other, 40, n_subsets=25, seed=5, results_path=path, progress=False)


def test_detection_metrics_equal_sklearn_and_refuse_other_labels():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    s, y = np.round(rng.normal(size=80), 1), rng.random(80) < 0.3  # rounding makes ties
    assert metrics.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(s, y.astype(int)) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    for bad in ([-1, 1] * 40, [1, 2] * 40):
        with pytest.raises(ValueError, match="positives must be booleans or 0 / 1"):
            metrics.roc_auc(s, bad)
    for k in (-1, 81, 2.5):
        with pytest.raises(ValueError, match="k must be an integer in \\[0, 80\\]"):
            metrics.recall_at_k(s, y, k=k)


def test_metrics_reexported():
    assert hf.metrics.lds is metrics.lds and callable(hf.metrics.roc_auc)


def test_lds_reproducible_with_sgd_training():
    import torch

    from hessfree.training import train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g)
    y = (x[:, 0] > 0).long()
    xt, yt = x[:8], y[:8]

    def train_fn(idx):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        train(model, (x[idx], y[idx]), epochs=3, lr=0.1, batch_size=16, seed=0, progress=False)
        return model

    def measure(model):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(xt), yt, reduction="none").numpy()

    scores = np.random.default_rng(0).normal(size=(8, 60))
    runs = [metrics.lds(scores, train_fn, measure, 60, n_subsets=8, seed=1, progress=False).mean for _ in range(2)]
    assert round(runs[0], 3) == round(runs[1], 3)
