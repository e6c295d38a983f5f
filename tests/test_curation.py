"""Curation, detection metrics and label noise against hand computation and scikit-learn."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

import hessfree as hf


def test_remove_and_relabel_pick_the_most_negative():
    scores = np.array([0.5, -2.0, 0.1, -0.3, 3.0, -2.0])
    np.testing.assert_array_equal(hf.curation.remove(scores, count=3), [1, 5, 3])
    np.testing.assert_array_equal(hf.curation.remove(scores, fraction=0.5), [1, 5, 3])
    idx, labels = hf.curation.relabel(scores, [0, 1, 2, 3, 4, 5], [9, 9, 9, 9, 9, 9], count=2)
    np.testing.assert_array_equal(idx, [1, 5])
    np.testing.assert_array_equal(labels, [0, 9, 2, 3, 4, 9])
    with pytest.raises(ValueError, match="exactly one of fraction"):
        hf.curation.remove(scores)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        hf.curation.remove(scores, fraction=1.5)


def test_remove_masks_and_bad_counts(monkeypatch):
    n = 10
    mask = np.zeros(n, bool)
    mask[[2, 9]] = True
    np.testing.assert_array_equal(np.flatnonzero(~hf.curation.keep_mask(n, mask)), [2, 9])
    np.testing.assert_array_equal(hf.curation.keep_mask(n, torch.tensor([9, 2])), ~mask)
    for bad, match in [([-1], r"in \[0, 10\), got \[-1\]"), ([10], "got \\[10\\]"), ([1.5], "must be integers"),
                       (np.zeros(3, bool), "one entry per example \\(10\\)")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            hf.curation.keep_mask(n, bad)
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    seen = []
    monkeypatch.setattr(hf.curation, "train", lambda model, data, **kw: seen.append(data))
    hf.curation.retrain(lambda: nn.Linear(3, 2), x, y, remove=mask, epochs=1)
    keep = np.flatnonzero(~mask)
    assert torch.equal(seen[0][0], x[keep]) and torch.equal(seen[0][1], y[keep])  # the 8 unmasked rows
    with pytest.raises(ValueError, match="count must be an integer in \\[0, 4\\], got 2.7"):
        hf.curation.remove(np.arange(4.0), count=2.7)
    with pytest.raises(ValueError, match="fraction=0.01 of 50 examples is 0.5, which rounds to 0 examples"):
        hf.curation.remove(np.arange(50.0), fraction=0.01)
    with pytest.raises(ValueError, match="scores must be one value per training example"):
        hf.curation.reweight(np.array([]))


def test_reweight_formulas():
    s = np.array([1.0, -1.0, 0.0, 2.0])
    z = (s - s.mean()) / s.std()
    soft = np.exp(z / 0.5) / np.exp(z / 0.5).sum()
    np.testing.assert_allclose(hf.curation.reweight(s, tau=0.5), np.clip(4 * 4 * soft, 0, 2))
    np.testing.assert_allclose(hf.curation.reweight(s, method="linear", strength=0.5), np.clip(1 + 0.5 * z, 0, 2))


def test_retrain_with_removal_equals_training_on_the_subset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g)
    y = (x[:, 0] > 0).long()

    def make():
        return nn.Linear(4, 2)

    removed = [3, 10, 11]
    a = hf.curation.retrain(make, x, y, remove=removed, seed=4, epochs=3, lr=0.1)
    keep = torch.tensor([i for i in range(50) if i not in removed])
    torch.manual_seed(4)
    b = make()
    hf.training.train(b, (x[keep], y[keep]), seed=4, epochs=3, lr=0.1)
    torch.testing.assert_close(a.weight, b.weight)


@pytest.mark.parametrize("seed", range(4))
def test_detection_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=200), 1)  # rounding creates ties
    labels = rng.random(200) < 0.2
    assert hf.metrics.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert hf.metrics.average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_recall_at_k_by_hand():
    scores = [0.9, 0.1, 0.8, 0.7, 0.2]
    positives = [1, 1, 0, 1, 0]
    assert hf.metrics.recall_at_k(scores, positives, k=2) == pytest.approx(1 / 3)
    assert hf.metrics.recall_at_k(scores, positives, fraction=0.6) == pytest.approx(2 / 3)


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_flip_labels_hits_the_rate_and_returns_the_mask(kind):
    y = np.repeat(np.arange(10), 50)
    noisy, flipped = hf.datasets.flip_labels(y, 0.2, n_classes=10, seed=1, kind=kind)
    assert flipped.sum() == 100
    np.testing.assert_array_equal(flipped, noisy != y)
    if kind == "asymmetric":
        np.testing.assert_array_equal(noisy[flipped], (y[flipped] + 1) % 10)


def test_demo_runs_end_to_end(tmp_path):
    from hessfree.demo import run_demo

    report = run_demo(out=tmp_path, epochs=4, n_train=400, n_val=150, retrain_seeds=1, verbose=False)
    assert (tmp_path / "suspects.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["estimated_noise_share"] == report["estimated_noise_share"]
    assert saved["flagged"] == round(saved["estimated_noise_share"] * 400)
    by_method = {r["method"]: r for r in saved["detection"]}
    # self-influence separates planted flips far better than chance
    assert by_method["self-influence, final model"]["roc_auc"] > 0.85
