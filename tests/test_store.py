"""The on-disk store: equal to in-memory scores, resumes after kill -9, refuses a
different configuration, and top-k equals argsort of the full matrix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_at_batch
from torch import nn

import hessfree as hf
from hessfree.projections import Factorized
from hessfree.store import StoreMismatchError


def _setup(seed=0, n=60):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    target = hf.targets.Utility((torch.randn(12, 6, generator=gen), torch.randint(0, 3, (12,), generator=gen)))
    test = (torch.randn(9, 6, generator=gen), torch.randint(0, 3, (9,), generator=gen))
    return hf.ClassificationTask(model), (x, y), target, test


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-3), ("bfloat16", 1e-2)])
def test_store_scores_equal_in_memory_scores(tmp_path, dtype, tol):
    task, train, target, test = _setup()
    members = hf.members.Dropout(n=2, p_max=0.3)
    ref = hf.Influence(task, members, projection=Factorized(16), batch_size=16).fit(train)
    est = hf.Influence(task, members, projection=Factorized(16), batch_size=16, store=tmp_path / "s", store_dtype=dtype)
    est.fit(train)
    a, b = ref.influence(target), est.influence(target)
    assert np.abs(a - b).max() <= tol * np.abs(a).max()
    p, q = ref.pairwise(test), est.pairwise(test)
    assert np.abs(p - q).max() <= tol * np.abs(p).max()
    np.testing.assert_allclose(est.self_influence(), ref.self_influence(), rtol=1e-6)  # fp32 norms before rounding
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["complete"] and meta["config"]["dtype"] == dtype and meta["config"]["n"] == 60
    item = np.dtype(np.float32).itemsize if dtype == "float32" else 2
    assert (tmp_path / "s" / "m0.features").stat().st_size == 60 * est.feature_dim[0] * item


def test_reopened_store_serves_queries_without_training_data(tmp_path):
    task, train, target, test = _setup()
    ref = hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(train)
    again = hf.Influence(task, batch_size=16, store=tmp_path / "s").fit()  # no data at all
    np.testing.assert_array_equal(again.influence(target), ref.influence(target))
    np.testing.assert_array_equal(again.pairwise(test), ref.pairwise(test))
    np.testing.assert_array_equal(again.self_influence(), ref.self_influence())


def test_wrong_configuration_reopen_raises(tmp_path):
    task, train, _, _ = _setup()
    hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(train)
    with pytest.raises(StoreMismatchError, match="projection"):
        hf.Influence(task, batch_size=16, store=tmp_path / "s", projection=Factorized(8)).fit(train)
    with pytest.raises(StoreMismatchError, match="params"):
        hf.Influence(task, params="2", batch_size=16, store=tmp_path / "s").fit(train)
    with pytest.raises(StoreMismatchError, match="dtype"):
        hf.Influence(task, batch_size=16, store=tmp_path / "s", store_dtype="float16").fit(train)
    x, y = train
    with pytest.raises(StoreMismatchError, match="data"):
        hf.Influence(task, batch_size=16, store=tmp_path / "s").fit((x.flip(0), y.flip(0)))
    other, *_ = _setup(seed=1)
    with pytest.raises(StoreMismatchError, match="model"):
        hf.Influence(other, batch_size=16, store=tmp_path / "s").fit(train)
    with pytest.raises(StoreMismatchError, match="model"):
        hf.Influence(other, batch_size=16, store=tmp_path / "s").fit()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreMismatchError, match="not a hessfree store"):
        hf.Influence(task, store=tmp_path / "junk").fit(train)


def test_incomplete_store_is_not_taken_for_complete(tmp_path):
    task, train, target, _ = _setup()

    class Boom(RuntimeError):
        pass

    calls = {"n": 0}
    real = hf.Influence._features

    def failing(self, view, names, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom()
        return real(self, view, names, batch)

    est = hf.Influence(task, batch_size=16, store=tmp_path / "s")
    est._features = failing.__get__(est)
    with pytest.raises(Boom):
        est.fit(train)
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["complete"] is False
    with pytest.raises(StoreMismatchError, match="incomplete"):
        hf.Influence(task, batch_size=16, store=tmp_path / "s").fit()
    resumed = hf.Influence(task, batch_size=16, store=tmp_path / "s")
    seen = []
    resumed._features = (lambda self, v, n, b: seen.append(b[0].shape[0]) or real(self, v, n, b)).__get__(resumed)
    resumed.fit(train)
    assert sum(seen) == 60 - 32  # only the two batches that were not written are recomputed
    clean = hf.Influence(task, batch_size=16).fit(train)
    np.testing.assert_array_equal(resumed.influence(target), clean.influence(target))


_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_store import _setup
    import hessfree as hf
    task, train, _, _ = _setup()
    real = hf.Influence._features
    def slow(self, view, names, batch):
        time.sleep(0.4)
        return real(self, view, names, batch)
    hf.Influence._features = slow
    hf.Influence(task, hf.members.Dropout(n=2), projection=hf.projections.Factorized(16), batch_size=8,
                 store={store!r}, store_dtype="float16").fit(train)
    """
)


def test_kill_9_mid_way_resumes_to_the_uninterrupted_result(tmp_path):
    store = tmp_path / "s"
    code = _CHILD.format(tests=str(Path(__file__).parent), store=str(store))
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            files = list((store / "progress").glob("m0.r0.json")) if (store / "progress").exists() else []
            if files and len(json.loads(files[0].read_text())) >= 3:
                break
            assert child.poll() is None, "the child finished or failed before it could be killed"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert json.loads((store / "meta.json").read_text())["complete"] is False
    task, train, target, test = _setup()
    kw = dict(projection=Factorized(16), batch_size=8, store_dtype="float16")
    resumed = hf.Influence(task, hf.members.Dropout(n=2), store=store, **kw).fit(train)
    clean = hf.Influence(task, hf.members.Dropout(n=2), store=tmp_path / "clean", **kw).fit(train)
    for m in range(2):
        a = np.fromfile(store / f"m{m}.features", dtype=np.float16)
        b = np.fromfile(tmp_path / "clean" / f"m{m}.features", dtype=np.float16)
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(resumed.influence(target), clean.influence(target))
    np.testing.assert_array_equal(resumed.pairwise(test), clean.pairwise(test))


@pytest.mark.parametrize("where", ["memory", "store", "recompute"])
def test_top_k_equals_argsort_of_the_full_matrix(tmp_path, where):
    task, train, _, test = _setup(n=70)
    kw = {"store": tmp_path / "s"} if where == "store" else {"max_cache_bytes": 0} if where == "recompute" else {}
    est = hf.Influence(task, hf.members.WeightNoise(n=2, sigma=0.05), batch_size=16, **kw).fit(train)
    est.score_block_rows = 13  # several blocks, not aligned with the batches
    full = est.pairwise(test)
    for largest in (True, False):
        top = est.top_k(test, 6, largest=largest)
        order = np.argsort(-full if largest else full, axis=1, kind="stable")[:, :6]
        np.testing.assert_array_equal(top.indices, order)
        np.testing.assert_allclose(top.scores, np.take_along_axis(full, order, 1), rtol=1e-5, atol=1e-7)
    assert est.top_k(test, 500).indices.shape == (9, 70)
    with pytest.raises(ValueError, match="k must be"):
        est.top_k(test, 0)
    # float32 for a float32 model, each (n_test, n_train) matrix column-major
    per_member = est.pairwise(test, reduce=None)
    assert full.dtype == top.scores.dtype == per_member.dtype == np.float32
    assert full.flags.f_contiguous and all(per_member[m].flags.f_contiguous for m in range(2))
    np.testing.assert_allclose(per_member.sum(0), full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("where", ["memory", "store", "recompute"])
def test_a_float64_model_gets_float64_top_k_that_separates_near_duplicates(tmp_path, where):
    task, (x, y), _, test = _setup(n=40)
    task.model.double()
    x = x.double()
    x = torch.cat([x, x[:1] * (1 + 1e-9)])  # a near-duplicate of row 0: scores differ in float64 only
    y = torch.cat([y, y[:1]])
    test = (test[0].double(), test[1])
    kw = {"store": tmp_path / "s"} if where == "store" else {"max_cache_bytes": 0} if where == "recompute" else {}
    est = hf.Influence(task, batch_size=16, **kw).fit((x, y))
    est.score_block_rows = 13
    full = est.pairwise(test)
    top = est.top_k(test, 41)
    assert full.dtype == top.scores.dtype == np.float64
    np.testing.assert_allclose(top.scores, -np.sort(-full, axis=1), rtol=1e-12, atol=1e-15)
    if where != "store":  # a store keeps float32 features: the near-duplicate rounds to row 0
        np.testing.assert_array_equal(top.indices, np.argsort(-full, axis=1, kind="stable"))


@pytest.mark.parametrize("into_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulated_scores_equal_one_matrix_product(dtype, into_dtype):
    """Products written in place (the dtypes agree) or through a temporary (they do not)."""
    from hessfree.scoring import accumulate_scores

    gen = torch.Generator().manual_seed(0)
    q, f = torch.randn(5, 8, generator=gen, dtype=dtype), torch.randn(23, 8, generator=gen)
    want = (f.double() @ q.double().T).numpy()
    into = torch.full((23, 5), float("nan"), dtype=into_dtype)  # fresh: nothing read from it
    accumulate_scores(into, q, ((s, f[s : s + 7]) for s in range(0, 23, 7)), 0.5, fresh=True)
    np.testing.assert_allclose(into.numpy(), 0.5 * want, rtol=1e-5, atol=1e-6)
    accumulate_scores(into, q, ((s, f[s : s + 4]) for s in range(0, 23, 4)), 2.0, fresh=False)
    np.testing.assert_allclose(into.numpy(), 2.5 * want, rtol=1e-5, atol=1e-6)
    # rows no block covers (another rank's, under torch.distributed) are 0, not what the memory held
    into.fill_(float("nan"))
    accumulate_scores(into, q, [(16, f[16:20]), (3, f[3:9])], 1.0, fresh=True)
    covered = np.zeros(23, bool)
    covered[3:9] = covered[16:20] = True
    np.testing.assert_allclose(into.numpy()[covered], want[covered], rtol=1e-5, atol=1e-6)
    assert (into.numpy()[~covered] == 0).all()


def test_bad_store_arguments():
    task, train, _, _ = _setup()
    with pytest.raises(ValueError, match="store_dtype"):
        hf.Influence(task, store="x", store_dtype="int8")
    with pytest.raises(TypeError, match="store must be a folder"):
        hf.Influence(task, store=3)
    with pytest.raises(ValueError, match="needs the training data"):
        hf.Influence(task).fit()


class _Counting(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.loaded = x, y, []

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.loaded.append(int(i))
        return self.x[i], self.y[i]


def test_a_plain_loader_loads_only_the_kept_batches():
    from hessfree.data import DataSource

    _, (x, y), _, _ = _setup(n=30)
    ds = _Counting(x, y)
    src = DataSource(torch.utils.data.DataLoader(ds, batch_size=8))
    full = list(src.batches())
    ds.loaded.clear()
    odd = list(src.batches_where(lambda b: b % 2 == 1))
    assert sorted(set(ds.loaded)) == list(range(8, 16)) + list(range(24, 30))
    assert [o for o, _ in odd] == [8, 24]
    for (o, (bx, by)), (fo, (fx, fy)) in zip(odd, [full[1], full[3]]):
        assert o == fo and torch.equal(bx, fx) and torch.equal(by, fy)


def test_resumed_store_loads_only_the_unfinished_batches(tmp_path, monkeypatch):
    task, (x, y), target, _ = _setup(n=200)
    ds = _Counting(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    real = hf.Influence._features
    with crash_at_batch(3):
        hf.Influence(task, batch_size=8, store=tmp_path / "s").fit(loader)
    ds.loaded.clear()
    seen = []
    monkeypatch.setattr(hf.Influence, "_features", lambda self, v, n, b: seen.append(len(b[0])) or real(self, v, n, b))
    resumed = hf.Influence(task, batch_size=8, store=tmp_path / "s").fit(loader)
    monkeypatch.setattr(hf.Influence, "_features", real)
    # gradients only for the unfinished batches; batch 1 (finished before the crash) is read once more,
    # without gradients, to check its data against the hash it was written with (batch 0 is read for
    # the first example and the label check, a spread sample for the data fingerprint)
    assert sum(seen) == 200 - 16
    sample = {int(i) for i in np.linspace(0, 199, num=64)}
    assert set(range(16, 200)) <= set(ds.loaded)
    assert sorted(i for i in ds.loaded if 8 <= i < 16 and i not in sample) == [i for i in range(8, 16) if i not in sample]
    ref = hf.Influence(task, batch_size=8).fit((x, y))
    np.testing.assert_allclose(resumed.influence(target), ref.influence(target), rtol=1e-5, atol=1e-7)


def test_score_block_rows_and_k_are_checked():
    task, train, _, test = _setup(n=30)
    est = hf.Influence(task, batch_size=16).fit(train)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="score_block_rows must be a positive integer"):
            est.score_block_rows = bad
    assert est.score_block_rows == 8192  # unchanged by the refusals
    est.score_block_rows = np.int64(7)
    assert est.score_block_rows == 7 and type(est.score_block_rows) is int
    full = est.pairwise(test)
    top = est.top_k(test, np.int64(4))  # numpy integers are integers
    np.testing.assert_allclose(top.scores, -np.sort(-full, axis=1)[:, :4], rtol=1e-6, atol=1e-7)
    for bad in (0, -2, 1.5, np.bool_(True)):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            est.top_k(test, bad)


@pytest.mark.parametrize("projection", [None, "dense", "factorized"])
def test_project_flat_refuses_gradients_of_another_length(projection):
    task, train, _, _ = _setup(n=20)
    proj = {"dense": hf.projections.Dense(8), "factorized": Factorized(8)}.get(projection)
    est = hf.Influence(task, batch_size=16, projection=proj).fit(train)
    fm = est.feature_map(0)
    d = sum(p.numel() for p in task.model.parameters())  # every parameter is selected
    assert fm.project_flat(torch.randn(d)).shape == (est.feature_dim[0],)
    assert fm.project_flat(torch.randn(3, d)).shape == (3, est.feature_dim[0])
    for shape in ((d + 5,), (d - 1,), (2, d + 1), (d,) * 3):
        with pytest.raises(ValueError, match=rf"project_flat expects gradients of shape \({d},\)"):
            fm.project_flat(torch.randn(*shape) if len(shape) < 3 else torch.randn(2, 2, d))
