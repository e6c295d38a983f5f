"""Exact influence (explicit Hessian, built here) against actual leave-one-out
retraining on L2-regularised logistic regression, where both are well defined."""

import numpy as np
import torch
import torch.nn.functional as F
from conftest import spearman
from torch import nn

import hessfree as hf

LAM = 0.05


def objective(theta, x, y):
    """Mean logistic loss + (LAM / 2) ||w||^2 (bias not regularised)."""
    w, b = theta[:-1], theta[-1]
    return F.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * LAM * w.pow(2).sum()


def fit(x, y, init):
    theta = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(theta, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def test_exact_if_tracks_leave_one_out_and_ip_is_reported(capsys):
    g = torch.Generator().manual_seed(0)
    n, d = 80, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = ((x @ torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64) + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)) > 0).double()
    xv = torch.randn(60, d, generator=g, dtype=torch.float64)
    yv = ((xv @ torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)) > 0).double()
    theta = fit(x, y, torch.zeros(d + 1, dtype=torch.float64))

    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:-1].view(1, -1))
        model.bias.copy_(theta[-1:])
    target = hf.targets.Utility((xv, yv))
    est = hf.Influence(hf.ClassificationTask(model)).fit((x, y))
    ip = est.influence(target)

    # explicit Hessian of the training objective and exact influence
    H = torch.autograd.functional.hessian(lambda t: objective(t, x, y), theta)
    t = theta.clone().requires_grad_(True)
    grad_f = torch.autograd.grad(F.binary_cross_entropy_with_logits(xv @ t[:-1] + t[-1], yv), t)[0]
    grads_train = torch.stack(
        [torch.autograd.grad(F.binary_cross_entropy_with_logits(x[i] @ t[:-1] + t[-1], y[i]), t)[0] for i in range(n)]
    )
    # IP from the library equals the plain inner products
    np.testing.assert_allclose(ip, (grads_train @ grad_f).numpy(), rtol=1e-9, atol=1e-12)
    exact = (grads_train @ torch.linalg.solve(H, grad_f)).numpy()

    # leave-one-out: removing a helpful example raises the validation loss
    f_full = target.evaluate(hf.ClassificationTask(model))
    loo = np.zeros(n)
    for i in range(n):
        keep = torch.arange(n) != i
        th = fit(x[keep], y[keep], theta)
        loo[i] = float(F.binary_cross_entropy_with_logits(xv @ th[:-1] + th[-1], yv)) - f_full
    # first order: f(theta_-i) - f(theta) ~ exact_i / n
    rho_exact = spearman(exact, loo)
    rho_ip = spearman(ip, loo)
    with capsys.disabled():
        print(f"\n[logistic regression, n={n}] Spearman vs LOO: exact IF {rho_exact:.3f}, IP (identity Hessian) {rho_ip:.3f}")
    assert rho_exact >= 0.9
    # removing one example also shifts the data-to-regulariser balance by a
    # constant for every i, so compare the slope: loo ~ c + exact / n
    slope, _ = np.polyfit(exact, loo, 1)
    assert abs(slope * n - 1) < 0.15, slope * n
    assert np.corrcoef(exact, loo)[0, 1] > 0.99
