"""The store never serves features whose inputs changed, and fails with a named error
(never a crash, never a silent wrong number) on damage, a full disk, a second writer,
a bad path or a store of an earlier format; it resumes from any kill point."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import crash_at_batch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import hessfree as hf
from hessfree.projections import Factorized

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def _setup(n=200, seed=0, weights=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    data = (x, y, torch.rand(n, generator=gen) + 0.5) if weights else (x, y)
    target = hf.targets.Utility((torch.randn(12, 6, generator=gen), torch.randint(0, 3, (12,), generator=gen)))
    return hf.ClassificationTask(model), data, target


def _unsampled(n: int, start: int = 0) -> int:
    """An example index the store's 64-example sample does not look at."""
    sample = {int(i) for i in np.linspace(0, n - 1, num=min(64, n))}
    return next(i for i in range(start, n) if i not in sample)


class _Rows(Dataset):
    """A plain map-style dataset over tensors (not a TensorDataset), counting what it loads."""

    def __init__(self, *tensors):
        self.tensors, self.loaded = tensors, []

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, i):
        self.loaded.append(int(i))
        return tuple(t[i] for t in self.tensors)


def _as(form: str, data, batch_size=16):
    return data if form == "tensors" else DataLoader(_Rows(*data), batch_size=batch_size)


def _changed(data, what: str, i: int):
    x, y, w = (t.clone() for t in data)
    if what == "label":
        y[i] = (y[i] + 1) % 3
    elif what == "input":
        x[i, 2] += 1e-3
    else:
        w[i] *= 1.5
    return x, y, w


# ---- 1. every example, label and weight is in the fingerprint ------------------------------------


@pytest.mark.parametrize("form", ["tensors", "loader"])
@pytest.mark.parametrize("what", ["label", "input", "weight"])
def test_any_changed_example_outside_the_sample_is_refused(tmp_path, form, what):
    task, data, target = _setup(weights=True)
    i = _unsampled(200, start=100)
    hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(_as(form, data))
    changed = _changed(data, what, i)
    assert not torch.equal(torch.cat([t.reshape(200, -1).double() for t in changed], 1),
                           torch.cat([t.reshape(200, -1).double() for t in data], 1))  # fmt: skip
    first = (i // 16) * 16
    with pytest.raises(hf.store.StoreMismatchError, match=rf"data.*rows {first}-{first + 15}"):
        hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(_as(form, changed))
    # the same data reuses the store, read at another batch size too, and equals a fresh in-memory fit
    again = hf.Influence(task, batch_size=40, store=tmp_path / "s").fit(_as(form, data, batch_size=40))
    ref = hf.Influence(task, batch_size=16).fit(data)
    np.testing.assert_allclose(again.influence(target), ref.influence(target), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("i", [0, 199])
def test_a_changed_example_inside_the_sample_is_named_by_its_rows(tmp_path, i):
    """Rows 0 and n-1 are always in the quick fingerprint: the error still names the batch."""
    task, data, _ = _setup(weights=True)
    hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(data)
    first = (i // 16) * 16
    with pytest.raises(hf.store.StoreMismatchError, match=rf"rows {first}-{min(first + 15, 199)} hold another"):
        hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(_changed(data, "label", i))


@pytest.mark.parametrize("form", ["tensors", "loader"])
def test_resume_with_data_changed_in_the_written_part_is_refused(tmp_path, form):
    task, data, _ = _setup(weights=True)
    with crash_at_batch(5):
        hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(_as(form, data))
    i = _unsampled(200, start=17)  # in batch 1, written before the crash
    assert 16 <= i < 32
    with pytest.raises(hf.store.StoreMismatchError, match="rows 16-31"):
        hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(_as(form, _changed(data, "label", i)))


def test_resume_computes_gradients_only_for_unwritten_batches_but_checks_the_written_ones(tmp_path, monkeypatch):
    task, (x, y), target = _setup()
    real = hf.Influence._features
    with crash_at_batch(4):
        hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(DataLoader(_Rows(x, y), batch_size=16))
    ds, seen = _Rows(x, y), []
    monkeypatch.setattr(hf.Influence, "_features", lambda self, v, n, b: seen.append(len(b[0])) or real(self, v, n, b))
    resumed = hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(DataLoader(ds, batch_size=16))
    monkeypatch.setattr(hf.Influence, "_features", real)
    assert sum(seen) == 200 - 48  # gradients of the unwritten rows only
    assert set(range(200)) <= set(ds.loaded)  # the written batches are read once, to hash them
    ref = hf.Influence(task, batch_size=16).fit((x, y))
    np.testing.assert_allclose(resumed.influence(target), ref.influence(target), rtol=1e-6, atol=1e-9)


def test_a_resume_at_another_batch_size_rewrites_the_batches_cut_otherwise(tmp_path):
    task, data, target = _setup(n=90)
    with crash_at_batch(3):
        hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(data)
    resumed = hf.Influence(task, batch_size=24, store=tmp_path / "s").fit(data)
    ref = hf.Influence(task, batch_size=24).fit(data)
    np.testing.assert_allclose(resumed.influence(target), ref.influence(target), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(resumed.self_influence(), ref.self_influence(), rtol=1e-6)
    recorded = sorted(tuple(r[:2]) for r in json.loads((tmp_path / "s" / "progress" / "m0.r0.json").read_text()))
    assert recorded == [(0, 24), (24, 24), (48, 24), (72, 18)]


def test_arrays_left_without_meta_by_an_earlier_version_are_created_anew(tmp_path):
    task, data, target = _setup(n=40)
    store = tmp_path / "s"
    (store / "progress").mkdir(parents=True)
    (store / "m0.features").write_bytes(b"\0" * 1000)  # allocated, then killed before its meta.json
    (store / "m0.sqnorm").write_bytes(b"\0" * 320)
    est = hf.Influence(task, batch_size=16, store=store).fit(data)
    ref = hf.Influence(task, batch_size=16).fit(data)
    np.testing.assert_allclose(est.influence(target), ref.influence(target), rtol=1e-6, atol=1e-9)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("mine")
    with pytest.raises(hf.store.StoreMismatchError, match="not a hessfree store.*notes.txt"):
        hf.Influence(task, store=tmp_path / "t").fit(data)


# ---- 2. the loss ------------------------------------------------------------------------------------


def _ce(outputs, labels):
    return F.cross_entropy(outputs, labels, reduction="none")


def _ce3(outputs, labels):
    return 3 * F.cross_entropy(outputs, labels, reduction="none")


def test_a_different_loss_is_refused(tmp_path):
    task, data, target = _setup()
    model = task.model
    hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(data)
    for other in (hf.Task(model, loss_fn=_ce3), hf.Task(model, loss_fn=_ce), hf.ClassificationTask(model, label_key="y")):
        with pytest.raises(hf.store.StoreMismatchError, match="loss"):
            hf.Influence(other, batch_size=16, store=tmp_path / "s").fit(data)
        with pytest.raises(hf.store.StoreMismatchError, match="loss"):
            hf.Influence(other, batch_size=16, store=tmp_path / "s").fit()
    # same task class, a loss three times larger: found from the stored examples' losses
    hf.Influence(hf.Task(model, loss_fn=_ce), batch_size=16, store=tmp_path / "t").fit(data)
    with pytest.raises(hf.store.StoreMismatchError, match="loss"):
        hf.Influence(hf.Task(model, loss_fn=_ce3), batch_size=16, store=tmp_path / "t").fit(data)
    with pytest.raises(hf.store.StoreMismatchError, match="loss"):
        hf.Influence(hf.Task(model, loss_fn=_ce3), batch_size=16, store=tmp_path / "t").fit()
    # the same loss written anew (another function object) reuses the store
    same = hf.Influence(hf.Task(model, loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none")),
                        batch_size=16, store=tmp_path / "t").fit()  # fmt: skip
    ref = hf.Influence(task, batch_size=16).fit(data)
    np.testing.assert_allclose(same.influence(target), ref.influence(target), rtol=1e-6, atol=1e-9)


def test_a_slightly_changed_model_is_refused(tmp_path):
    task, data, _ = _setup()
    hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(data)
    with torch.no_grad():
        task.model[2].bias[1] += 1e-6
    for train in (data, None):
        with pytest.raises(hf.store.StoreMismatchError, match="model"):
            hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(train)


# ---- 3. example.pt -----------------------------------------------------------------------------------


def test_example_file_holds_two_examples_not_the_underlying_tensor(tmp_path):
    task, _, target = _setup()
    gen = torch.Generator().manual_seed(3)
    big_x, big_y = torch.randn(200_000, 6, generator=gen), torch.randint(0, 3, (200_000,), generator=gen)
    train = (big_x[1000:1060], big_y[1000:1060])  # views into 4.8 MB of storage
    hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(train)
    assert (tmp_path / "s" / "example.pt").stat().st_size < 4096
    saved = torch.load(tmp_path / "s" / "example.pt", weights_only=True)
    assert torch.equal(saved[0], big_x[1000:1002]) and torch.equal(saved[1], big_y[1000:1002])
    again = hf.Influence(task, batch_size=16, store=tmp_path / "s").fit()
    ref = hf.Influence(task, batch_size=16).fit((big_x[1000:1060].clone(), big_y[1000:1060].clone()))
    np.testing.assert_allclose(again.influence(target), ref.influence(target), rtol=1e-6, atol=1e-9)


# ---- 4. a full disk ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (mount -t tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True, capture_output=True)


_FULL = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_store_integrity import _disk_setup
    import hessfree as hf
    task, members, data = _disk_setup()
    try:
        hf.Influence(task, members, projection=hf.projections.Factorized(256), batch_size=200,
                     store={store!r}).fit(data)
    except hf.store.StoreFullError as e:
        print("StoreFullError:", e)
        sys.exit(0)
    print("no error")
    """
)


def _disk_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(2000, 20, generator=gen), torch.randint(0, 10, (2000,), generator=gen))
    return hf.ClassificationTask(model), hf.members.Dropout(n=2, p_max=0.2), data


def test_a_full_disk_is_an_error_at_open_and_the_store_resumes_once_space_is_freed(tmp_path):
    with _tmpfs(tmp_path / "mnt", "2m") as mnt:
        store = mnt / "s"
        code = _FULL.format(tests=str(TESTS), store=str(store))
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"rc {run.returncode}: {run.stderr[-2000:]}"
        msg = run.stdout
        need = 2 * 2000 * 256 * 4 + 2 * 2000 * 8  # two members' features and squared norms
        assert "StoreFullError" in msg and str(store) in msg, msg
        nums = [int(t.replace(",", "")) for t in msg.replace("(", " ").split() if t.replace(",", "").isdigit()]
        assert any(0.9 * need <= v <= need + 65536 for v in nums), msg  # the bytes needed
        assert any(v <= 2 * 1024 * 1024 for v in nums), msg  # the bytes free
        _remount(mnt, "size=16m")
        task, members, data = _disk_setup()
        kw = dict(projection=Factorized(256), batch_size=200)
        resumed = hf.Influence(task, members, store=store, **kw).fit(data)
        ref = hf.Influence(task, members, **kw).fit(data)
        np.testing.assert_allclose(resumed.self_influence(), ref.self_influence(), rtol=1e-6)
        assert json.loads((store / "meta.json").read_text())["complete"] is True


# ---- 5. a kill at any point of creating and writing a store ------------------------------------------


class _Killed(BaseException):
    """Stands in for kill -9: no ``except Exception`` handler sees it."""


def _kill_at(monkeypatch, k: int) -> list:
    """Raise _Killed at the k-th file-system step (replace, fsync, fallocate, memmap, torch.save)."""
    count = []
    targets = [(os, "replace"), (os, "fsync"), (np, "memmap"), (torch, "save")]
    if hasattr(os, "posix_fallocate"):
        targets.append((os, "posix_fallocate"))
    for mod, name in targets:
        real = getattr(mod, name)

        def step(*a, _real=real, **kw):
            count.append(1)
            if len(count) == k:
                raise _Killed()
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, step)
    return count


def test_a_kill_at_any_step_resumes_to_the_uninterrupted_store(tmp_path, monkeypatch):
    task, data, target = _setup(n=32)
    kw = dict(members=hf.members.Dropout(n=2, p_max=0.2), projection=Factorized(12), batch_size=16)
    clean = hf.Influence(task, **kw, store=tmp_path / "clean", store_dtype="float16").fit(data)
    want = clean.influence(target)
    files = {m: (tmp_path / "clean" / f"m{m}.features").read_bytes() for m in range(2)}
    k = 0
    while True:
        k += 1
        store = tmp_path / f"k{k}"
        with monkeypatch.context() as mp:
            count = _kill_at(mp, k)
            try:
                hf.Influence(task, **kw, store=store, store_dtype="float16").fit(data)
                killed = False
            except _Killed:
                killed = True
        if not killed:
            assert k > 10, f"only {len(count)} steps"
            break
        if store.exists():  # what kill -9 also leaves: temporary files of interrupted writes
            (store / f".meta.json.{os.getpid() + 1}.tmp").write_text("{")
            if (store / "progress").exists():
                (store / "progress" / f".m0.r0.json.{os.getpid() + 1}.tmp").write_text("[")
        resumed = hf.Influence(task, **kw, store=store, store_dtype="float16").fit(data)
        for m in range(2):
            assert (store / f"m{m}.features").read_bytes() == files[m], f"kill at step {k}"
        np.testing.assert_array_equal(resumed.influence(target), want, err_msg=f"kill at step {k}")


# ---- 6. damaged files ---------------------------------------------------------------------------------


def test_a_truncated_feature_file_is_named_with_its_size(tmp_path):
    task, data, _ = _setup(n=60)
    est = hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(data)
    f = tmp_path / "s" / "m0.features"
    want = 60 * est.feature_dim[0] * 4
    assert f.stat().st_size == want
    with open(f, "r+b") as fh:
        fh.truncate(want - 100)
    for train in (data, None):
        with pytest.raises(hf.store.StoreCorruptError, match=rf"m0\.features.*{want - 100}.*{want}"):
            hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(train)


@pytest.mark.parametrize("kind", ["features", "sqnorm"])
def test_corrupted_bytes_are_found_on_read(tmp_path, kind):
    task, data, target = _setup(n=60)
    members = hf.members.Dropout(n=2, p_max=0.2)
    est = hf.Influence(task, members, batch_size=16, store=tmp_path / "s").fit(data)
    f = tmp_path / "s" / f"m1.{kind}"
    row_bytes = est.feature_dim[1] * 4 if kind == "features" else 8
    raw = bytearray(f.read_bytes())
    raw[37 * row_bytes + 1] ^= 0x10  # one bit of row 37 (batch rows 32-47)
    f.write_bytes(bytes(raw))
    again = hf.Influence(task, members, batch_size=16, store=tmp_path / "s")
    with pytest.raises(hf.store.StoreCorruptError, match=rf"m1\.{kind}.*rows 32-47"):
        again.fit(data)
        again.influence(target)
        again.self_influence()


# ---- 7. two writers ----------------------------------------------------------------------------------

_PAUSED = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from test_store_integrity import _setup
    import hessfree as hf
    real = os.replace
    def paused(src, dst, *a, **k):
        if str(dst).endswith("meta.json") and not os.path.exists(dst):
            time.sleep(600)  # another process pauses right before its first meta.json
        return real(src, dst, *a, **k)
    os.replace = paused
    task, data, _ = _setup(n=60)
    hf.Influence(task, batch_size=16, store={store!r}).fit(data)
    """
)


def test_a_second_writer_is_told_which_process_writes_the_store(tmp_path):
    store = tmp_path / "s"
    child = subprocess.Popen([sys.executable, "-c", _PAUSED.format(tests=str(TESTS), store=str(store))])
    try:
        deadline = time.time() + 120
        while not (store.exists() and list(store.glob(".meta.json.*.tmp"))):
            assert child.poll() is None and time.time() < deadline, "the child did not reach its first meta.json"
            time.sleep(0.05)
        task, data, target = _setup(n=60)
        with pytest.raises(hf.store.StoreLockedError, match=rf"process {child.pid}\b"):
            hf.Influence(task, batch_size=16, store=store).fit(data)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    # the writer was killed there: the store is created anew and equals a fresh fit
    resumed = hf.Influence(task, batch_size=16, store=store).fit(data)
    ref = hf.Influence(task, batch_size=16).fit(data)
    np.testing.assert_allclose(resumed.influence(target), ref.influence(target), rtol=1e-6, atol=1e-9)


# ---- 8. bad paths -------------------------------------------------------------------------------------


def test_a_store_path_that_is_a_file_is_named(tmp_path):
    task, data, _ = _setup(n=20)
    (tmp_path / "f").write_text("x")
    for path in (tmp_path / "f", tmp_path / "f" / "s"):
        with pytest.raises(hf.store.StoreError, match=rf"{re.escape(str(tmp_path / 'f'))}.* is a file.*folder"):
            hf.Influence(task, store=path).fit(data)


def test_a_read_only_folder_is_named_and_a_complete_store_there_is_still_read(tmp_path):
    task, data, target = _setup(n=40)
    with _tmpfs(tmp_path / "mnt", "4m") as mnt:
        _remount(mnt, "ro")
        with pytest.raises(hf.store.StoreError, match=rf"(?i)cannot write.*{re.escape(str(mnt / 's'))}.*read-only.*writ"):
            hf.Influence(task, batch_size=16, store=mnt / "s").fit(data)
        _remount(mnt, "rw")
        written = hf.Influence(task, batch_size=16, store=mnt / "s").fit(data)
        _remount(mnt, "ro")
        for train in (data, None):
            again = hf.Influence(task, batch_size=16, store=mnt / "s").fit(train)
            np.testing.assert_array_equal(again.influence(target), written.influence(target))


# ---- old stores ---------------------------------------------------------------------------------------


def test_a_store_of_the_earlier_format_asks_to_be_rebuilt(tmp_path):
    task, data, _ = _setup(n=40)
    hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(data)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    old = {k: v for k, v in meta["config"].items() if k not in ("loss", "probe_loss", "estimator")}
    (tmp_path / "s" / "meta.json").write_text(json.dumps({"config": {**old, "format": 1}, "complete": True}))
    for p in (tmp_path / "s" / "progress").glob("*.json"):
        p.write_text(json.dumps([r[:2] for r in json.loads(p.read_text())]))
    for train in (data, None):
        with pytest.raises(hf.store.StoreMismatchError, match="earlier version.*format 1.*rebuild"):
            hf.Influence(task, batch_size=16, store=tmp_path / "s").fit(train)


# ---- torchrun ranks with different data -----------------------------------------------------------------

_RANKS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from test_store_integrity import _setup, _unsampled, _Rows
    import hessfree as hf
    rank, world = hf.distributed.init("gloo")
    torch.set_num_threads(1)
    out = Path({out!r})
    task, (x, y), _ = _setup(n=80)
    for case in ("tensors", "loader"):
        x1, y1 = x.clone(), y.clone()
        if rank == 1:  # rank 1 holds one other label, outside the sample (in rank 0's share: batch 0 or 2)
            i = _unsampled(80)
            y1[i] = (y1[i] + 1) % 3
        data = (x1, y1) if case == "tensors" else torch.utils.data.DataLoader(_Rows(x1, y1), batch_size=16)
        try:
            hf.Influence(task, batch_size=16, store=out / case).fit(data)
            (out / f"{{case}}{{rank}}.txt").write_text("finished")
        except (hf.store.StoreMismatchError, hf.DataError) as e:
            (out / f"{{case}}{{rank}}.txt").write_text(f"{{type(e).__name__}}: {{e}}")
    torch.distributed.destroy_process_group()
    """
)


def test_ranks_given_different_data_fail_on_every_rank(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS.format(tests=str(TESTS), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for case in ("tensors", "loader"):
        for rank in (0, 1):
            text = (tmp_path / f"{case}{rank}.txt").read_text()
            # tensors are compared whole before any gradient; a loader by its first batch (this label may be in
            # it), else by the store's batch hashes
            want = ("DataError",) if case == "tensors" else ("DataError", "StoreMismatchError")
            assert text.startswith(want) and "data" in text, (case, rank, text)
