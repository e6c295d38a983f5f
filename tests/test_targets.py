"""Scores against finite differences: one SGD step of size eta on example i
changes the target by about -eta * score_i.

The one-step change is f(theta - eta g_i) - f0 = -eta s_i + c_i eta^2 + O(eta^3),
with c_i the curvature of f along g_i. The test measures the step and the
opposite step: their half difference must equal -eta s_i up to O(eta^3)
(relative 1e-6 at eta = 1e-4 in float64), and the plain one-step change must
equal -eta s_i up to the measured second-order term.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import mlp
from torch import nn

import hessfree as hf

ETA = 1e-4


def sgd_step_on(model, x, y, i, eta=ETA):
    """A copy of ``model`` after one SGD step of size ``eta`` on example ``i`` alone."""
    stepped = copy.deepcopy(model)
    loss = F.cross_entropy(stepped(x[i : i + 1]), y[i : i + 1])
    grads = torch.autograd.grad(loss, list(stepped.parameters()))
    with torch.no_grad():
        for p, g in zip(stepped.parameters(), grads):
            p -= eta * g
    return stepped


def make_targets(xv, yv, groups):
    return {
        "utility": hf.targets.Utility((xv, yv)),
        "dp": hf.targets.DemographicParity((xv, yv), groups=groups, favourable=1),
        "dp_loss": hf.targets.DemographicParity((xv, yv), groups=groups, form="loss_difference"),
        "eo": hf.targets.EqualOpportunity((xv, yv), groups=groups, favourable=1),
        "pgd": hf.targets.Robustness((xv, yv), attack=hf.attacks.PGD(eps=0.3, steps=5)),
        "pgd_l2": hf.targets.Robustness((xv, yv), attack=hf.attacks.PGD(eps=0.5, steps=5, norm="l2")),
        "fgsm": hf.targets.Robustness((xv, yv), attack=hf.attacks.FGSM(eps=0.2)),
        "custom": hf.targets.Custom(lambda m, b: m(b[0]).logsumexp(1).mean(), (xv, yv)),
    }


def fixed_value(target, task, model):
    """Target at ``model`` with any adversarial inputs held at the original model's."""
    if isinstance(target, hf.targets.Robustness):
        return target._fixed.evaluate(task, model)
    return target.evaluate(task, model)


CASES = [(k, 1024) for k in ("utility", "dp", "dp_loss", "eo", "pgd", "pgd_l2", "fgsm", "custom")]
CASES += [(k, 7) for k in ("utility", "dp", "eo", "pgd")]  # the two-pass batched gradient


@pytest.mark.parametrize("kind, batch_size", CASES)
def test_score_predicts_change_after_one_sgd_step(blobs, val_blobs, kind, batch_size):
    x, y = blobs
    xv, yv, groups = val_blobs
    model = mlp()
    task = hf.ClassificationTask(model)
    target = make_targets(xv, yv, groups)[kind]
    target.source.batch_size = batch_size
    if isinstance(target, hf.targets.Robustness):
        target._fixed = hf.targets.Utility(target.adversarial(task))
    scores = hf.Influence(task).fit((x, y)).influence(target)
    f0 = fixed_value(target, task, model)
    for i in range(0, len(x), 8):
        f_step = fixed_value(target, task, sgd_step_on(model, x, y, i))
        f_back = fixed_value(target, task, sgd_step_on(model, x, y, i, eta=-ETA))
        predicted = -ETA * scores[i]
        central = (f_step - f_back) / 2
        second_order = abs(f_step + f_back - 2 * f0) / 2
        assert abs(central - predicted) <= 1e-6 * abs(predicted) + 1e-13, (kind, i, central, predicted)
        assert abs((f_step - f0) - predicted) <= 1.01 * second_order + 1e-13, (kind, i, f_step - f0, predicted)


def fd_gradient(model, value_fn, h=1e-6):
    """Central finite-difference gradient of value_fn(model) w.r.t. every parameter."""
    out = []
    for p in model.parameters():
        g = torch.zeros_like(p)
        flat = p.data.view(-1)
        for j in range(flat.numel()):
            old = flat[j].item()
            flat[j] = old + h
            up = value_fn(model)
            flat[j] = old - h
            down = value_fn(model)
            flat[j] = old
            g.view(-1)[j] = (up - down) / (2 * h)
        out.append(g.reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["dp", "dp_loss", "eo", "pgd"])
def test_fairness_and_robustness_gradients_match_finite_differences(val_blobs, kind):
    xv, yv, groups = val_blobs
    model = mlp(hidden=4)
    task = hf.ClassificationTask(model)
    target = make_targets(xv, yv, groups)[kind]
    fixed = hf.targets.Utility(target.adversarial(task)) if kind == "pgd" else target
    view = hf.members.MemberView(hf.members.MemberSpec("model"), model, task, (xv[:1], yv[:1]), torch.device("cpu"))
    names = [n for n, _ in model.named_parameters()]
    analytic = hf.gradients.flatten(target.gradient(view, names), names)
    numeric = fd_gradient(model, lambda m: fixed.evaluate(task, m))
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_fairness_values_match_hand_computation(val_blobs):
    xv, yv, groups = val_blobs
    model = mlp()
    task = hf.ClassificationTask(model)
    with torch.no_grad():
        p = torch.softmax(model(xv), 1)[:, 1]
    g0, g1 = groups == 0, groups == 1
    dp = abs(p[g0].mean() - p[g1].mean()).item()
    pos = yv == 1
    eo = abs(p[g0 & pos].mean() - p[g1 & pos].mean()).item()
    assert hf.targets.DemographicParity((xv, yv), groups=groups).evaluate(task) == pytest.approx(dp, rel=1e-12)
    assert hf.targets.EqualOpportunity((xv, yv), groups=groups).evaluate(task) == pytest.approx(eo, rel=1e-12)
    # three groups: mean absolute pairwise gap
    g3 = torch.arange(len(xv)) % 3
    means = [p[g3 == k].mean().item() for k in range(3)]
    gap3 = np.mean([abs(means[a] - means[b]) for a, b in [(0, 1), (0, 2), (1, 2)]])
    assert hf.targets.DemographicParity((xv, yv), groups=g3).evaluate(task) == pytest.approx(gap3, rel=1e-12)
    # signed loss difference
    with torch.no_grad():
        losses = F.cross_entropy(model(xv), yv, reduction="none")
    diff = (losses[g1].mean() - losses[g0].mean()).item()
    t = hf.targets.DemographicParity((xv, yv), groups=groups, form="loss_difference", order=(1, 0))
    assert t.evaluate(task) == pytest.approx(diff, rel=1e-12)


@pytest.mark.parametrize("outputs", [1, 2])
def test_linear_minimal_lands_at_minus_overshoot_times_margin(outputs):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(25, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Linear(4, outputs).double()
    task = hf.ClassificationTask(model)
    target = hf.targets.Robustness((x, y), attack=hf.attacks.LinearMinimal(overshoot=0.3))
    x_adv = target.adversarial(task)[0]

    def margin(z):
        with torch.no_grad():
            out = model(z)
        return out.reshape(-1) if outputs == 1 else out[:, 1] - out[:, 0]

    before, after = margin(x), margin(x_adv)
    right = (before > 0) == (y == 1)  # correctly classified: attacked; misclassified: left alone
    assert 0 < int(right.sum()) < 25
    torch.testing.assert_close(after[right], -0.3 * before[right], rtol=1e-10, atol=1e-12)
    assert torch.all(torch.sign(after[right]) == -torch.sign(before[right]))
    torch.testing.assert_close(x_adv[~right], x[~right], rtol=0, atol=0)
    with torch.no_grad():  # so no prediction is correct under attack, and no loss falls
        assert not bool(((after > 0) == (y == 1)).any())
        assert bool((task.per_example_loss(model, (x_adv, y)) >= task.per_example_loss(model, (x, y))).all())
    # the perturbation is along w: minimal in L2 among points with that margin
    w = model.weight.detach()
    w = w[0] if outputs == 1 else w[1] - w[0]
    direction = (x_adv - x)[right] / (x_adv - x)[right].norm(dim=1, keepdim=True)
    torch.testing.assert_close(direction.abs() @ (w.abs() / w.norm()), torch.ones(int(right.sum()), dtype=torch.float64))


def test_pgd_stays_in_ball_and_raises_loss(val_blobs):
    xv, yv, _ = val_blobs
    model = mlp()
    task = hf.ClassificationTask(model)
    for norm, eps in (("linf", 0.2), ("l2", 0.5)):
        t = hf.targets.Robustness((xv, yv), attack=hf.attacks.PGD(eps=eps, steps=10, norm=norm))
        x_adv = t.adversarial(task)[0]
        d = x_adv - xv
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert float(size.max()) <= eps + 1e-9
        assert t.evaluate(task) > hf.targets.Utility((xv, yv)).evaluate(task)


def binary_blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] - x[:, 1] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    return x, y


@pytest.mark.parametrize("batch_size", [1024, 6])
def test_linear_minimal_through_the_attack_tracks_a_fresh_attack(batch_size):
    """With hold_fixed=False the score predicts the change of the robustness
    target when the attack is re-run at the stepped model."""
    x, y = binary_blobs(30, 0)
    xv, yv = binary_blobs(20, 1)
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    task = hf.ClassificationTask(model)
    target = hf.targets.Robustness((xv, yv), attack=hf.attacks.LinearMinimal(0.3), hold_fixed=False, batch_size=batch_size)
    scores = hf.Influence(task).fit((x, y)).influence(target)
    f0 = target.evaluate(task)
    moved = 0.0
    for i in range(0, 30, 5):
        f_step = target.evaluate(task, sgd_step_on(model, x, y, i))
        f_back = target.evaluate(task, sgd_step_on(model, x, y, i, eta=-ETA))
        predicted = -ETA * scores[i]
        assert abs((f_step - f_back) / 2 - predicted) <= 1e-6 * abs(predicted) + 1e-13, (i, (f_step - f_back) / 2, predicted)
        assert abs((f_step - f0) - predicted) <= 1.01 * abs(f_step + f_back - 2 * f0) / 2 + 1e-13
        moved = max(moved, abs(predicted))
    assert moved > 0
    # the held-fixed score is a different quantity here (the attack moves with the weights)
    fixed = hf.Influence(task).fit((x, y)).influence(hf.targets.Robustness((xv, yv), attack=hf.attacks.LinearMinimal(0.3)))
    assert not np.allclose(fixed, scores, rtol=1e-3)


def test_hold_fixed_false_needs_a_closed_form_attack(val_blobs):
    xv, yv, _ = val_blobs
    with pytest.raises(ValueError, match="differentiable closed form"):
        hf.targets.Robustness((xv, yv), attack=hf.attacks.PGD(eps=0.1), hold_fixed=False)


def test_pgd_l2_random_start_is_uniform_in_the_ball():
    """In 2-d a uniform point of the disc has |delta| <= eps/2 with probability 1/4 (a uniform
    point of the square clamped to the disc: pi/16 = 0.196)."""
    eps, n = 1.0, 4000
    attack = hf.attacks.PGD(eps=eps, steps=1, step_size=1e-9, norm="l2", seed=3)
    x = torch.zeros(n, 2, dtype=torch.float64)
    delta = attack.perturb(x, lambda z: z.sum(1), None)  # one negligible step from the start
    r = delta.norm(dim=1)
    assert float(r.max()) <= eps + 1e-8
    assert abs(float((r <= eps / 2).double().mean()) - 0.25) < 0.025
    angle = torch.atan2(delta[:, 1], delta[:, 0])
    assert abs(float((angle > 0).double().mean()) - 0.5) < 0.03


@pytest.mark.parametrize("make, match", [
    (lambda: hf.attacks.PGD(eps=float("nan")), r"PGD: eps must be a finite number >= 0, got nan"),
    (lambda: hf.attacks.PGD(eps="0.1"), r"PGD: eps must be a finite number >= 0, got '0.1'"),
    (lambda: hf.attacks.PGD(eps=0.1, step_size=-0.1), r"PGD: step_size must be a finite number > 0"),
    (lambda: hf.attacks.PGD(eps=0.1, clip=(1, 0)), r"PGD: clip must be \(low, high\) with low < high"),
    (lambda: hf.attacks.FGSM(eps=float("inf")), r"FGSM: eps must be a finite number >= 0, got inf"),
])  # fmt: skip
def test_attack_arguments_are_refused_by_name(make, match):
    """Also: tensor eps and per-feature tensor / array clip bounds are accepted."""
    x = torch.randn(5, 3)
    lo, hi = x.min(0).values, x.max(0).values
    out = hf.attacks.FGSM(torch.tensor(0.5), clip=(lo, hi)).perturb(x, lambda z: z.sum(1), None)
    assert bool(((out >= lo) & (out <= hi)).all())
    assert hf.attacks.PGD(eps=0.1, clip=np.array([0.0, 1.0])).clip == (0.0, 1.0)
    with pytest.raises(ValueError, match=match):
        make()


def test_fairness_targets_refuse_what_they_would_ignore():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    task = hf.ClassificationTask(model)
    x, y, g = torch.randn(12, 4), torch.tensor([0, 1, 2] * 4), np.array([0, 0, 1, 1] * 3)
    with pytest.raises(ValueError, match="favourable=3, but the model gives 3 classes"):
        hf.targets.DemographicParity((x, y), groups=g, favourable=3).evaluate(task)
    with pytest.raises(ValueError, match=r"favourable \(a class index\) must be an integer >= 0, got -1"):
        hf.targets.DemographicParity((x, y), groups=g, favourable=-1)
    with pytest.raises(ValueError, match="order= sets the sign of form='loss_difference'"):
        hf.targets.DemographicParity((x, y), groups=g, order=(1, 0))
    with pytest.raises(ValueError, match="order must name two different groups"):
        hf.targets.DemographicParity((x, y), groups=g, form="loss_difference", order=(0, 0))
    with pytest.raises(ValueError, match="carry sample weights, which group fairness targets do not use"):
        hf.targets.DemographicParity((x, y, torch.ones(12)), groups=g).evaluate(task)
    for groups, match in [(np.array(["a", None] * 6, dtype=object), r"missing values \(None or NaN\) at \[1, 3"),
                          (np.array(["a", 1] * 6, dtype=object), "mixes strings and numbers")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            hf.targets.DemographicParity((x, y), groups=groups)
