"""Each application improves, by actual retraining, the quantity it promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hessfree as hf
from hessfree.apps import defend, find_noisy_labels, group_gap, repair_fairness
from hessfree.datasets import flip_labels
from hessfree.metrics import roc_auc
from hessfree.output_space import member_probabilities, output_self_influence
from hessfree.training import accuracy, train

TRAIN = dict(epochs=15, lr=0.1, momentum=0.9, batch_size=64, progress=False)


def blobs(n: int, k: int, seed: int, spread: float = 1.0, dim: int = 10):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=torch.Generator().manual_seed(123)) * 2.0
    y = torch.arange(n) % k
    x = centres[y] + spread * torch.randn(n, dim, generator=g)
    return x, y


def mlp(dim: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, k))


def test_noisy_labels_found_and_removing_them_helps():
    x, y = blobs(600, 4, seed=0, spread=1.5)
    xt, yt = blobs(2000, 4, seed=1, spread=1.5)
    # 30% symmetric noise: retraining on all of it costs about 7 points of test accuracy
    noisy, flipped = flip_labels(y.numpy(), 0.3, seed=0)
    yn = torch.from_numpy(noisy)
    torch.manual_seed(0)
    model = mlp(10, 4)
    res = train(model, (x, yn), checkpoints=True, seed=0, **TRAIN)
    report = find_noisy_labels(
        hf.ClassificationTask(model), (x, yn), members=hf.members.Checkpoints(res.checkpoints, res.lrs)
    )
    # the table is sorted and aligned with the training order
    assert np.all(np.diff(report.score) <= 0)
    assert np.array_equal(report.given_label, noisy[report.index])
    assert report.uncertainty.shape == (600,) and (report.uncertainty >= 0).all()
    assert roc_auc(report.suspicion(), flipped) > 0.9
    # a top-k report keeps the count of ranked examples: shares are of all of them, training order is refused
    top = report.top(60)
    assert top.total == 600 and np.array_equal(top.flagged(0.05), report.flagged(0.05))
    with pytest.raises(ValueError, match="holds the top 60 of 600"):
        top.suspicion()
    with pytest.raises(ValueError, match="holds the top 60"):
        top.flagged(0.2)
    assert "60 most suspicious of 600" in top.summary()
    # retraining without the flagged share beats retraining on everything (same seed and recipe)
    flagged = report.flagged(flipped.mean())
    base = hf.curation.retrain(lambda: mlp(10, 4), x, yn, seed=0, **TRAIN)
    cleaned = hf.curation.retrain(lambda: mlp(10, 4), x, yn, remove=flagged, seed=0, **TRAIN)
    assert accuracy(cleaned, xt, yt) > accuracy(base, xt, yt) + 0.03


def test_noisy_labels_utility_methods_need_val():
    x, y = blobs(60, 3, seed=0)
    model = mlp(10, 3)
    with pytest.raises(ValueError, match="needs validation data"):
        find_noisy_labels(hf.ClassificationTask(model), (x, y), method="utility")
    with pytest.raises(ValueError, match="method must be one of"):
        find_noisy_labels(hf.ClassificationTask(model), (x, y), method="loss")


def test_noisy_labels_class_utility_against_autograd_loop():
    """class_utility equals minus the worst per-class mean of g_i . g_j, by a plain autograd loop."""
    x, y = blobs(40, 3, seed=0)
    xv, yv = blobs(30, 3, seed=5)
    torch.manual_seed(0)
    model = mlp(10, 3)
    train(model, (x, y), seed=0, **{**TRAIN, "epochs": 3})
    rep = find_noisy_labels(hf.ClassificationTask(model), (x, y), val=(xv, yv), method="class_utility", params="all")

    def grad(xi, yi):
        loss = nn.functional.cross_entropy(model(xi[None]), yi[None])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])

    gv = torch.stack([grad(a, b) for a, b in zip(xv, yv)])
    expected = []
    for xi, yi in zip(x, y):
        dots = gv @ grad(xi, yi)
        expected.append(-min(float(dots[yv == c].mean()) for c in range(3)))
    np.testing.assert_allclose(rep.suspicion(), expected, rtol=1e-4, atol=1e-6)


def binary_data(n: int, seed: int, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.tensor([2.0, -1.0, 1.0, 0.5, 0.0])[:dim]
    y = (x @ w + 0.3 * torch.randn(n, generator=g) > 0).long()
    return x, y


def test_defend_raises_accuracy_under_attack():
    x, y = binary_data(400, 0)
    # planted harmful points: a cluster of flipped labels near the boundary
    g = torch.Generator().manual_seed(9)
    bad = torch.randn(40, 5, generator=g) * 0.5 + torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    x = torch.cat([x, bad])
    y = torch.cat([y, torch.zeros(40, dtype=torch.long)])
    xv, yv = binary_data(300, 1)
    xt, yt = binary_data(600, 2)
    tk = dict(epochs=20, lr=0.1, momentum=0.9, batch_size=64)
    res = defend(lambda: nn.Linear(5, 1), (x, y), (xv, yv), (xt, yt), fraction=0.1, train_kwargs=tk)
    rnd = defend(lambda: nn.Linear(5, 1), (x, y), (xv, yv), (xt, yt), fraction=0.1, train_kwargs=tk, strategy="random")
    assert "LinearMinimal" in res.attack
    assert res.attacked_acc_after > res.attacked_acc_before + 0.05
    assert res.attacked_acc_after > rnd.attacked_acc_after
    assert res.clean_acc_after >= res.clean_acc_before - 0.01
    # planted examples are acted on far above their 9% share of the training data
    assert np.mean(res.indices >= 400) > 0.3
    # the options of the estimator behind the influence scores; none for the random baseline
    assert res.estimator["hessian"] == "identity" and res.estimator["members"] == "AsIs()" and rnd.estimator is None
    d = res.to_dict()
    assert d["indices"] == res.indices.tolist() and d["action"] == "remove"


def test_group_gap_matches_counting():
    pred = np.array([1, 1, 0, 0, 1, 0])
    y = np.array([1, 1, 1, 0, 1, 1])
    g = np.array([0, 0, 0, 1, 1, 1])
    assert group_gap(pred, y, g, "dp") == pytest.approx(2 / 3 - 1 / 3)
    assert group_gap(pred, y, g, "eo") == pytest.approx(2 / 3 - 1 / 2)
    for args, match in [((pred, y, g, "dp", 2), "favourable=2 is neither a label nor a prediction"),
                        ((pred, y, np.zeros(6)), "at least two groups"),
                        ((pred * 0.7, y, g), "hard class predictions"),
                        ((pred, y[:5], g), "one entry per example")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            group_gap(*args)


def test_best_narrows_the_gap_and_counts_an_exact_one_point_drop():
    from hessfree.apps.fairness import FairnessPoint, FairnessResult

    acc = np.float32(60 / 100)
    res = FairnessResult("dp", "remove", "influence", gap_before=0.20, acc_before=float(acc),
                         curve=[FairnessPoint(0.02, 0.25, float(np.float32(60 / 100))),  # wider gap: never best
                                FairnessPoint(0.05, 0.15, float(np.float32(59 / 100))),  # exactly 1 point lower
                                FairnessPoint(0.10, 0.05, float(np.float32(55 / 100)))])  # fmt: skip
    assert res.best().fraction == 0.05
    assert res.best(max_acc_drop=0.0) is None  # the only point within 0 points widens the gap


def fair_data(n: int, seed: int, planted: int = 0):
    g = torch.Generator().manual_seed(seed)
    grp = (torch.rand(n, generator=g) < 0.4).long()
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g) > 0).long()
    feats = torch.cat([x, grp[:, None].float()], dim=1)
    if planted:
        # planted unfair points: group-1 members with positive features labelled 0
        px = torch.randn(planted, 4, generator=g).abs()
        pf = torch.cat([px, torch.ones(planted, 1)], dim=1)
        feats, y = torch.cat([feats, pf]), torch.cat([y, torch.zeros(planted, dtype=torch.long)])
        grp = torch.cat([grp, torch.ones(planted, dtype=torch.long)])
    return feats, y, grp


def test_repair_fairness_shrinks_the_gap():
    x, y, _ = fair_data(500, 0, planted=60)
    xv, yv, gv = fair_data(400, 1)
    xt, yt, gt = fair_data(1000, 2)
    tk = dict(epochs=20, lr=0.1, momentum=0.9, batch_size=64)
    res = repair_fairness(lambda: nn.Linear(5, 1), (x, y), (xv, yv), gv, (xt, yt), gt, fractions=(0.05, 0.1), train_kwargs=tk)
    rnd = repair_fairness(
        lambda: nn.Linear(5, 1), (x, y), (xv, yv), gv, (xt, yt), gt, fractions=(0.05, 0.1), train_kwargs=tk, strategy="random"
    )
    assert res.gap_before > 0.1
    assert res.curve[-1].gap < 0.7 * res.gap_before
    for a, b in zip(res.curve, rnd.curve):
        assert a.gap < b.gap
    # the most harmful examples are the planted ones
    assert np.mean(np.argsort(res.scores)[:60] >= 500) > 0.6
    assert res.to_dict()["curve"][0]["fraction"] == 0.05
    assert res.to_dict()["estimator"]["hessian"] == "identity" and rnd.estimator is None
    # target_options reach the target: the scores equal the influence on that target, computed directly
    res_model = hf.apps._retrain.fit_model(lambda: nn.Linear(5, 1), x, y, 0, tk)
    opts = {"form": "loss_difference", "order": (1, 0)}
    signed = repair_fairness(lambda: nn.Linear(5, 1), (x, y), (xv, yv), gv, (xt, yt), gt, fractions=(0.05,), train_kwargs=tk,
                             base_model=res_model, target_options=opts)
    direct = hf.Influence(hf.ClassificationTask(res_model)).fit((x, y)).influence(
        hf.targets.DemographicParity((xv, yv), groups=gv, **opts))
    np.testing.assert_allclose(signed.scores, direct, rtol=1e-6, atol=1e-12)


def test_combined_is_the_sum_of_z_scores():
    x, y = blobs(80, 3, seed=0)
    xv, yv = blobs(30, 3, seed=5)
    torch.manual_seed(0)
    model = mlp(10, 3)
    train(model, (x, y), seed=0, **{**TRAIN, "epochs": 3})
    task = hf.ClassificationTask(model)
    own = find_noisy_labels(task, (x, y)).suspicion()
    # default: ||softmax - onehot||^2 (closed form), minus its median within the given class
    with torch.no_grad():
        r = (torch.softmax(model(x).double(), -1) - nn.functional.one_hot(y, 3)).pow(2).sum(1).numpy()
    expected = r.copy()
    for c in range(3):
        expected[y.numpy() == c] -= np.median(r[y.numpy() == c])
    np.testing.assert_allclose(own, expected, rtol=1e-5, atol=1e-7)
    # self_weights: log of the squared output-layer gradient norm, by an autograd loop
    last = list(model.parameters())[-2:]
    loop = []
    for xi, yi in zip(x, y):
        g = torch.autograd.grad(nn.functional.cross_entropy(model(xi[None]), yi[None]), last)
        loop.append(float(sum(t.pow(2).sum() for t in g).log()))
    np.testing.assert_allclose(find_noisy_labels(task, (x, y), method="self_weights").suspicion(), loop, rtol=1e-4, atol=1e-5)
    cls = find_noisy_labels(task, (x, y), val=(xv, yv), method="class_utility").suspicion()
    comb = find_noisy_labels(task, (x, y), val=(xv, yv), method="combined").suspicion()

    def z(a):
        return (a - a.mean()) / a.std()

    np.testing.assert_allclose(comb, z(own) + z(cls), rtol=1e-5, atol=1e-7)  # float32 pairwise scores


def test_output_self_influence_against_closed_form_over_checkpoints_and_weights():
    """sum_m lr_m * w_i^2 * ||softmax(f(x_i; theta_m)) - onehot(y_i)||^2, checkpoint by checkpoint."""

    x, y = blobs(50, 3, seed=0)
    torch.manual_seed(0)
    model = mlp(10, 3)
    res = train(model, (x, y), checkpoints=True, seed=0, **{**TRAIN, "epochs": 3})
    lrs = [0.3, 0.2, 0.1]
    w = torch.linspace(0.5, 2.0, 50)
    got = output_self_influence(hf.ClassificationTask(model), (x, y, w), hf.members.Checkpoints(res.checkpoints, lrs),
                                reduce=None, batch_size=16)
    probe = mlp(10, 3)
    for m, (state, lr) in enumerate(zip(res.checkpoints, lrs)):
        probe.load_state_dict(state)
        with torch.no_grad():
            r = (torch.softmax(probe(x), -1) - nn.functional.one_hot(y, 3)).pow(2).sum(1) * w.pow(2)
        np.testing.assert_allclose(got[m], lr * r.double().numpy(), rtol=1e-5, atol=1e-9)
    total = output_self_influence(hf.ClassificationTask(model), (x, y, w), hf.members.Checkpoints(res.checkpoints, lrs))
    np.testing.assert_allclose(total, got.sum(0), rtol=1e-5)  # other batch size: float32 rounding
    # binary logit outputs: (sigmoid(f) - y)^2, through autograd of the task's own loss
    bmodel = mlp(10, 1)
    yb = (y == 0).float()
    got_b = output_self_influence(hf.ClassificationTask(bmodel), (x, yb))
    with torch.no_grad():
        ref = (torch.sigmoid(bmodel(x).squeeze(-1)) - yb).pow(2).double().numpy()
    np.testing.assert_allclose(got_b, ref, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="reduce must be"):
        output_self_influence(hf.ClassificationTask(model), (x, y), reduce="max")


def test_suggested_labels_average_the_members_probabilities():
    """suggest="members": argmax of the mean over checkpoints of softmax(f(x; theta_m)),
    against a loop that loads each checkpoint; without members it is the prediction."""
    x, y = blobs(120, 3, seed=0, spread=2.0)
    noisy, _ = flip_labels(y.numpy(), 0.3, seed=0)
    yn = torch.from_numpy(noisy)
    torch.manual_seed(0)
    model = mlp(10, 3)
    res = train(model, (x, yn), checkpoints=True, seed=0, **{**TRAIN, "epochs": 4})
    task, ck = hf.ClassificationTask(model), hf.members.Checkpoints(res.checkpoints, [0.4, 0.3, 0.2, 0.1])
    probe, ref = mlp(10, 3), torch.zeros(120, 3, dtype=torch.float64)
    for state in res.checkpoints:
        probe.load_state_dict(state)
        with torch.no_grad():
            ref += torch.softmax(probe(x), -1).double() / len(res.checkpoints)
    got = member_probabilities(task, (x, yn), ck, batch_size=32)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)  # float32 softmax
    report = find_noisy_labels(task, (x, yn), members=ck)
    np.testing.assert_array_equal(report.suggestions(), ref.argmax(1).numpy())
    # the estimated share of wrong labels: suggested != given, and flagged() takes that many from the top
    share = float(np.mean(ref.argmax(1).numpy() != noisy))
    assert report.estimated_noise_share() == pytest.approx(share)
    top = np.argsort(-report.suspicion(), kind="stable")[: round(share * 120)]
    np.testing.assert_array_equal(np.sort(report.flagged()), np.sort(top))
    with pytest.raises(ValueError, match="fraction must be in"):
        report.flagged(1.5)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    np.testing.assert_array_equal(find_noisy_labels(task, (x, yn), members=ck, suggest="prediction").suggestions(), pred)
    np.testing.assert_array_equal(find_noisy_labels(task, (x, yn)).suggestions(), pred)
    with pytest.raises(ValueError, match="suggest must be one of"):
        find_noisy_labels(task, (x, yn), suggest="vote")


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_auto_picks_class_utility_for_systematic_noise_and_self_otherwise(kind):
    # 10 classes: with few classes a symmetric flip's harm is less cancelled in the mean validation
    # loss, the plain utility ranks flips well too, and either choice is right
    x, y = blobs(1500, 10, seed=0, spread=1.5)
    xv, yv = blobs(500, 10, seed=5, spread=1.5)
    mapping = {c: c + 1 for c in range(0, 10, 2)} if kind == "asymmetric" else None
    noisy, flipped = flip_labels(y.numpy(), 0.2, seed=0, kind=kind, mapping=mapping)
    yn = torch.from_numpy(noisy)
    torch.manual_seed(0)
    model = mlp(10, 10)
    res = train(model, (x, yn), checkpoints=True, seed=0, **TRAIN)
    task = hf.ClassificationTask(model)
    ck = hf.members.Checkpoints(res.checkpoints, res.lrs)
    auto = find_noisy_labels(task, (x, yn), val=(xv, yv), members=ck)
    want = "class_utility" if kind == "asymmetric" else "self, not centred"
    assert auto.method == f"auto -> {want}"
    d = auto.diagnostics
    assert (d["overlap_class_utility_utility"] > d["overlap_class_utility_self"]) == (kind == "asymmetric")
    if kind == "asymmetric":
        same = find_noisy_labels(task, (x, yn), val=(xv, yv), members=ck, method="class_utility").suspicion()
    else:  # the summed output-space self-influence, before the class centring
        same = output_self_influence(task, (x, yn), ck)
    np.testing.assert_allclose(auto.suspicion(), same, rtol=1e-12)
    assert roc_auc(auto.suspicion(), flipped) > 0.9
    # without validation data "auto" is "self"
    alone = find_noisy_labels(task, (x, yn), members=ck)
    assert alone.method == "auto -> self" and alone.diagnostics == {}
    np.testing.assert_allclose(alone.suspicion(), find_noisy_labels(task, (x, yn), members=ck, method="self").suspicion())


def test_auto_utility_from_pairwise_equals_the_utility_method():
    """auto derives the plain utility from the pairwise scores; it must equal method='utility'."""
    from hessfree.apps.noisy_labels import _top_overlap

    x, y = blobs(300, 10, seed=0, spread=1.5)
    xv, yv = blobs(100, 10, seed=5, spread=1.5)
    torch.manual_seed(0)
    model = mlp(10, 10)
    res = train(model, (x, y), checkpoints=True, seed=0, **{**TRAIN, "epochs": 3})
    task, ck = hf.ClassificationTask(model), hf.members.Checkpoints(res.checkpoints, res.lrs)
    auto = find_noisy_labels(task, (x, y), val=(xv, yv), members=ck)
    util = find_noisy_labels(task, (x, y), val=(xv, yv), members=ck, method="utility").suspicion()
    cls = find_noisy_labels(task, (x, y), val=(xv, yv), members=ck, method="class_utility").suspicion()
    assert auto.diagnostics["overlap_class_utility_utility"] == _top_overlap(cls, util)
    assert auto.diagnostics["overlap_class_utility_self"] == _top_overlap(cls, output_self_influence(task, (x, y), ck))


def test_default_attack_is_linear_minimal_only_for_a_binary_linear_model():
    from hessfree.apps.defense import default_attack

    assert isinstance(default_attack(nn.Linear(4, 1)), hf.attacks.LinearMinimal)
    assert isinstance(default_attack(nn.Sequential(nn.Linear(4, 2))), hf.attacks.LinearMinimal)
    assert isinstance(default_attack(nn.Linear(4, 3)), hf.attacks.PGD)  # LinearMinimal needs a binary classifier
    assert isinstance(default_attack(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))), hf.attacks.PGD)


def test_defend_refuses_a_negative_clean_weight():
    x, y = blobs(40, 2, seed=0)
    with pytest.raises(ValueError, match="clean_weight must be a finite number >= 0, got -1"):
        defend(lambda: nn.Linear(10, 2), (x, y), (x, y), (x, y), clean_weight=-1)
