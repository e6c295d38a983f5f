"""TracIn-CP, dropout, weight-noise and model members against hand-written sums."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import loop_grads, mlp
from torch import nn

import hessfree as hf


def utility_grad(model, xv, yv):
    loss = F.cross_entropy(model(xv), yv)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def train_grads(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    return loop_grads(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), len(x), names)


def test_tracin_cp_equals_hand_written_sum(blobs, val_blobs, tmp_path):
    x, y = blobs
    xv, yv, _ = val_blobs
    model = mlp()
    states, lrs = [], [0.3, 0.2, 0.1]
    for k in range(3):
        states.append({n: p.detach().clone() + 0.05 * k for n, p in model.state_dict().items()})
    # one checkpoint as a file, to exercise lazy loading
    torch.save(states[1], tmp_path / "ckpt1.pt")
    ckpts = hf.members.Checkpoints([states[0], tmp_path / "ckpt1.pt", states[2]], lrs=lrs)
    est = hf.Influence(hf.ClassificationTask(model), members=ckpts).fit((x, y))
    scores = est.influence(hf.targets.Utility((xv, yv)))
    expected = np.zeros(len(x))
    expected_self = np.zeros(len(x))
    for state, lr in zip(states, lrs):
        ref = mlp()
        ref.load_state_dict(state)
        g = train_grads(ref, x, y)
        expected += lr * (g @ utility_grad(ref, xv, yv)).numpy()
        expected_self += lr * g.pow(2).sum(1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(est.self_influence(), expected_self, rtol=1e-9)
    # the live model was not modified by evaluating checkpoints
    assert torch.equal(model[0].weight, mlp()[0].weight)


def test_reduce_none_rows_sum_to_ensemble_and_mean(blobs, val_blobs):
    x, y = blobs
    xv, yv, _ = val_blobs
    members = hf.members.Checkpoints([mlp(seed=s).state_dict() for s in range(2)], lrs=[0.5, 0.25]) * hf.members.Dropout(n=3, p_max=0.3)
    est = hf.Influence(hf.ClassificationTask(mlp()), members=members).fit((x, y))
    target = hf.targets.Utility((xv, yv))
    rows = est.influence(target, reduce=None)
    assert rows.shape == (6, len(x))
    np.testing.assert_allclose(rows.sum(0), est.influence(target), rtol=1e-12)
    np.testing.assert_allclose(rows.mean(0), est.influence(target, reduce="mean"), rtol=1e-12)
    np.testing.assert_allclose(est.self_influence(reduce=None).sum(0), est.self_influence(), rtol=1e-12)
    per_member = est.pairwise((xv[:4], yv[:4]), reduce=None)
    assert per_member.shape == (6, 4, len(x))
    np.testing.assert_allclose(per_member.sum(0), est.pairwise((xv[:4], yv[:4])), rtol=1e-12)
    np.testing.assert_allclose(per_member.mean(0), est.pairwise((xv[:4], yv[:4]), reduce="mean"), rtol=1e-12)
    assert est.member_weights.tolist() == [0.5] * 3 + [0.25] * 3


def test_dropout_member_equals_explicitly_masked_model(blobs, val_blobs):
    """A dropout member's score equals the score of a model with the same fixed mask written by hand."""
    x, y = blobs
    xv, yv, _ = val_blobs
    model = mlp(hidden=16)
    seed = next(s for s in range(100) if hf.members.Dropout(n=1, p_max=0.6, seed=s).specs()[0].masks[0].p > 0.3)
    members = hf.members.Dropout(n=1, p_max=0.6, seed=seed)
    est = hf.Influence(hf.ClassificationTask(model), members=members).fit((x, y))
    scores = est.influence(hf.targets.Utility((xv, yv)))
    p = members.specs()[0].masks[0].p
    keep = (torch.rand(16, generator=torch.Generator().manual_seed(members.specs()[0].masks[0].seed)) >= p).double() / (1 - p)
    assert 0 < keep.count_nonzero() < 16

    class Masked(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, z):
            return self.base[2](self.base[1](self.base[0](z) * keep))

    masked = Masked(model)
    g = loop_grads(masked, lambda i: F.cross_entropy(masked(x[i : i + 1]), y[i : i + 1]), len(x), [f"base.{n}" for n, _ in model.named_parameters()])
    loss = F.cross_entropy(masked(xv), yv)
    gv = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(masked.parameters()))])
    np.testing.assert_allclose(scores, (g @ gv).numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [lambda s: hf.members.Dropout(n=4, p_max=0.4, seed=s), lambda s: hf.members.WeightNoise(n=4, sigma=0.05, seed=s)])
def test_random_members_reproducible_by_seed_and_distinct(blobs, make):
    x, y = blobs
    task = hf.ClassificationTask(mlp())
    a = hf.Influence(task, members=make(0)).fit((x, y)).self_influence(reduce=None)
    b = hf.Influence(task, members=make(0)).fit((x, y)).self_influence(reduce=None)
    c = hf.Influence(task, members=make(1)).fit((x, y)).self_influence(reduce=None)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    for i in range(4):  # every member differs from every other one
        for j in range(i):
            assert not np.allclose(a[i], a[j])


def test_weight_noise_member_equals_perturbed_model(blobs):
    x, y = blobs
    model = mlp()
    est = hf.Influence(hf.ClassificationTask(model), members=hf.members.WeightNoise(n=1, sigma=0.1, seed=7)).fit((x, y))
    gen = torch.Generator().manual_seed(hf.members.WeightNoise(n=1, sigma=0.1, seed=7).specs()[0].noise[0][1])
    noisy = mlp()
    with torch.no_grad():
        for p in noisy.parameters():
            p += 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
    np.testing.assert_allclose(est.self_influence(), train_grads(noisy, x, y).pow(2).sum(1).numpy(), rtol=1e-9)


def test_models_members_sum_over_models(blobs, val_blobs):
    x, y = blobs
    xv, yv, _ = val_blobs
    models = [mlp(seed=s) for s in range(3)]
    est = hf.Influence(hf.ClassificationTask(models[0]), members=hf.members.Models(models)).fit((x, y))
    expected = sum((train_grads(m, x, y) @ utility_grad(m, xv, yv)).numpy() for m in models)
    np.testing.assert_allclose(est.influence(hf.targets.Utility((xv, yv))), expected, rtol=1e-9, atol=1e-12)
