"""Per-example-gradient throughput, store memory and scoring speed, against peers.

Side by side in one run, on the same synthetic MNIST-sized data (28x28 inputs,
10 classes) and batch size 256:

* ``train_step``: forward + backward of the mean loss (the speed limit);
* ``hf_vmap``: hessfree full per-example gradients ``(B, D)`` formed per batch with
  torch.func vmap (the ``projection=None`` engine), plus their squared norms;
* ``hf_exact_hooks``: the same from the hook engine (``Factorized(None)``);
* ``hf_fact_1024`` / ``hf_fact_4096``: hessfree factorized projection, k = 1024 / 4096;
* ``captum_tracincp``: Captum ``TracInCP`` self-influence (sample-wise grads per batch);
* ``trak_featurize``: TRAK ``featurize`` with its CPU ``BasicProjector``, k = 1024;
* ``dattri_tracin``: dattri ``TracInAttributor`` self-attribution;
* ``hf_dense_512`` / ``hf_dense_512_nocache`` (MLP 784-128-10): dense projection of
  the vmap gradients to k = 512, with the default block cache (the whole matrix,
  208 MB, fits) and with ``cache_bytes=0`` (blocks generated again every batch);

on an MLP 784-1024-1024-10 and a small CNN. The peers' per-example paths are
time-boxed (``--peer-budget`` seconds, whole batches): their rate is measured on
the batches they finish. Plus: self-influence over 10 epoch
checkpoints on an MLP 784-128-10 (hessfree ``fit`` + ``self_influence`` with
``Factorized(None)``, which takes exact norms without forming gradients, vs Captum
``TracInCP``); peak RSS of featurizing N and 2N synthetic examples (generated on
the fly by a Dataset) into a k = 1024 fp16 store; and the
GFLOP/s of scoring ``n_store x 1000`` from the store against ``torch.mm`` on the
same shapes in memory.

A GPT-2-shaped causal LM (``transformers.GPT2LMHeadModel`` from a ``GPT2Config``
with random weights: 6 layers, n_embd 384, 6 heads, sequence length 128, vocab
50257 by default, input and output embeddings tied as GPT-2 has them;
``hf.LanguageModelTask``, every one of the 128 random tokens a target,
``params="all"``), at batch ``--lm-batch`` (default 8):

* ``train_step``: forward + backward + AdamW step of the batch-mean task loss
  (train mode, GPT-2's default dropout);
* ``hf_fact_4096``: ``fit`` + ``self_influence`` with ``Factorized(4096)``,
  ``engine="auto"`` (every GPT-2 parameter has a hook rule);
* ``hf_exact_auto``: the same with ``projection=None`` (exact per-example gradients,
  ~30M floats each at vocab 50257), on a quarter of the examples at half the batch;
* ``lm_check`` (not timed): on 3 examples, ``est.features`` with ``Factorized(4096)``
  against ``est.feature_map(0).project_flat`` of a plain per-example autograd loop
  over ``est.param_names(0)``; the largest relative error per example must be <= 1e-3.

The estimator's one-time check of its engine against a per-example loop (on the
first 4 examples, inside ``fit``) is timed apart (``check_seconds``);
``steady_examples_per_s`` leaves it out, as ``train_step`` leaves out its
warm-up step. It is negligible on the CNN, but about 0.4 s on the MLP (some 45%
of a 4000-example fit) and 9 s or more on the transformer (a third or more of a
32-example fit), so both rates are reported.

Every case runs in its own process, so its peak RSS (``ru_maxrss``, including
the ~0.3 GB of the Python + torch import) is its own. Peers are optional (the
``bench`` extra); a missing peer is reported as skipped.

    python benchmarks/throughput.py                      # full run (n = 4000, store 100k/200k, LM 32)
    python benchmarks/throughput.py --quick              # small sizes (LM vocab 8192), a few minutes
    python benchmarks/throughput.py --only transformer   # only some rows (comma-separated groups,
                                                         # models or cases; printed, written with --out)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

BATCH = 256
LM = {"vocab": 50257, "batch": 8, "seq": 128}  # the GPT-2-shaped transformer (set from the command line)
LM_CHECK_EXAMPLES = 3


# ---- models and data ---------------------------------------------------------------------------


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        import transformers

        cfg = transformers.GPT2Config(
            vocab_size=LM["vocab"], n_positions=LM["seq"], n_embd=384, n_layer=6, n_head=6, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(cfg)  # tie_word_embeddings=True: lm_head.weight is wte.weight
    if name == "mlp_big":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    if name == "mlp_small":
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    if name == "cnn":
        return CNN()
    raise ValueError(name)


def make_data(model_name: str, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if model_name == "gpt2":  # random tokens, every one a target (labels = input_ids)
        ids = torch.randint(0, LM["vocab"], (n, LM["seq"]), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    x = torch.randn(n, 1, 28, 28, generator=gen) if model_name == "cnn" else torch.randn(n, 784, generator=gen)
    return x, torch.randint(0, 10, (n,), generator=gen)


def make_task(model_name: str, model: nn.Module):
    import hessfree as hf

    return hf.LanguageModelTask(model) if model_name == "gpt2" else hf.ClassificationTask(model)


def batch_size(model_name: str) -> int:
    return LM["batch"] if model_name == "gpt2" else BATCH


def _rows_of(data, s: int, e: int):
    return {k: v[s:e] for k, v in data.items()} if isinstance(data, dict) else tuple(t[s:e] for t in data)


PEER_BUDGET = 120.0  # seconds a peer's per-example path may run; its rate is measured on the batches done


def _timeboxed(step, n, budget, t0) -> dict:
    """Run ``step(start, stop)`` batch by batch until ``n`` examples or ``budget`` seconds."""
    done = 0
    for s in range(0, n, BATCH):
        e = min(s + BATCH, n)
        step(s, e)
        done = e
        if time.perf_counter() - t0 > budget:
            break
    secs = time.perf_counter() - t0
    return {"seconds": secs, "examples_done": done, "examples_per_s": done / secs}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- one case per process ----------------------------------------------------------------------------


def case_train_step(model_name, n, tmp):
    if model_name == "gpt2":
        return _lm_train_step(n)
    model = make_model(model_name)
    x, y = make_data(model_name, n)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x[:BATCH]), y[:BATCH]).backward()  # warm-up: the steady-state rate is the limit
    t, c = time.perf_counter(), time.process_time()
    for s in range(0, n, BATCH):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[s : s + BATCH]), y[s : s + BATCH]).backward()
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c}


def _lm_train_step(n):
    """Forward + backward + AdamW step of the batch-mean task loss, ``LM["batch"]`` examples a step."""
    model = make_model("gpt2").train()
    task = make_task("gpt2", model)
    data = make_data("gpt2", n)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = LM["batch"]

    def step(s):
        opt.zero_grad(set_to_none=True)
        task.per_example_loss(model, _rows_of(data, s, s + b)).mean().backward()
        opt.step()

    step(0)  # warm-up (AdamW state allocated): the steady-state rate is the limit
    t, c = time.perf_counter(), time.process_time()
    for s in range(0, n, b):
        step(s)
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c}


class _CheckTimer:
    """Time spent in the estimator's one-time engine check (``ProjectedFeatures._check``,
    a per-example loop on the first examples), by wrapping it in this process only."""

    def __init__(self):
        self.seconds, self.cpu_seconds = 0.0, 0.0

    def __enter__(self):
        from hessfree.gradients import projected

        self._cls = projected.ProjectedFeatures
        self._orig = getattr(self._cls, "_check", None)
        if self._orig is None:
            self.seconds = None
            return self
        orig = self._orig

        def timed(obj, *a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return orig(obj, *a, **k)
            finally:
                self.seconds += time.perf_counter() - t
                self.cpu_seconds += time.process_time() - c

        self._cls._check = timed
        return self

    def __exit__(self, *exc):
        if self._orig is not None:
            self._cls._check = self._orig


def _hf_fit(model_name, n, projection, members=None, tmp=None, batch=None, engine="auto"):
    import hessfree as hf

    model = make_model(model_name)
    data = make_data(model_name, n)
    params = "all" if model_name == "gpt2" else None
    est = hf.Influence(
        make_task(model_name, model), members, params=params, batch_size=batch or batch_size(model_name),
        projection=projection, max_cache_bytes=0, progress=False, engine=engine,
    )  # fmt: skip
    with _CheckTimer() as check:
        t, c = time.perf_counter(), time.process_time()
        est.fit(data)
        est.self_influence()
        secs, cpu = time.perf_counter() - t, time.process_time() - c
    res = {"seconds": secs, "examples_per_s": n / secs, "cpu_seconds": cpu, "check_seconds": check.seconds}
    if check.seconds is not None:
        res["check_cpu_seconds"] = check.cpu_seconds
        res["steady_examples_per_s"] = n / (secs - check.seconds)
        res["steady_cpu_examples_per_s"] = n / (cpu - check.cpu_seconds)
    fmap = est.feature_map(0)
    res.update(feature_dim=est.feature_dim[0], n_params=fmap.total, units=len(fmap.units), fallback=fmap.fallback)
    return res


def case_hf_exact_auto(model_name, n, tmp):
    """Exact per-example gradients (``projection=None``, ``engine="auto"``); on the
    transformer at half its batch size (each example's gradient is the model's size)."""
    b = max(1, LM["batch"] // 2) if model_name == "gpt2" else None
    res = _hf_fit(model_name, n, None, batch=b)
    res["batch"] = b or batch_size(model_name)
    return res


def case_lm_check(model_name, n, tmp):
    """``est.features`` (Factorized(4096), hooks) against the projection of a plain
    per-example autograd loop over ``est.param_names(0)``; not timed."""
    import hessfree as hf

    model = make_model(model_name).eval()
    task = make_task(model_name, model)
    data = make_data(model_name, n, seed=1)
    est = hf.Influence(task, params="all", projection=hf.projections.Factorized(4096), batch_size=n, progress=False)
    est.fit(data)
    feats = est.features(data)
    names = est.param_names(0)
    params = dict(model.named_parameters())
    rows = []
    for i in range(n):
        loss = task.per_example_loss(model, _rows_of(data, i, i + 1)).sum()
        grads = torch.autograd.grad(loss, [params[k] for k in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    ref = est.feature_map(0).project_flat(torch.stack(rows).float())
    rel = ((feats - ref).norm(dim=1) / ref.norm(dim=1)).tolist()
    tied = model.lm_head.weight is model.transformer.wte.weight if model_name == "gpt2" else None
    return {"max_rel_err": max(rel), "rel_err": rel, "feature_dim": feats.shape[1], "n_params": sum(params[k].numel() for k in names),
            "tied_embeddings": tied, "check": "ok" if max(rel) <= 1e-3 else "FAIL"}  # fmt: skip


def case_hf_dense_512(model_name, n, tmp):
    import hessfree as hf

    return _hf_fit(model_name, n, hf.projections.Dense(512))


def case_hf_dense_512_nocache(model_name, n, tmp):
    import hessfree as hf

    return _hf_fit(model_name, n, hf.projections.Dense(512, cache_bytes=0))


def _engine_loop(model_name, n, engine):
    """Form the full ``(B, D)`` per-example gradients of every batch (one batch held at a time)."""
    import hessfree as hf
    from hessfree.members import AsIs, MemberView

    model = make_model(model_name).eval()
    x, y = make_data(model_name, n)
    task = hf.ClassificationTask(model)
    view = MemberView(AsIs().specs()[0], model, task, (x[:1], y[:1]), torch.device("cpu"))
    names = [k for k, _ in model.named_parameters()]
    form = engine(view, names)
    t = time.perf_counter()
    with view:
        for s in range(0, n, BATCH):
            g = form((x[s : s + BATCH], y[s : s + BATCH]))
            torch.einsum("bd,bd->b", g, g)  # the self-influence from the formed gradients
            del g
    return time.perf_counter() - t


def case_hf_vmap(model_name, n, tmp):
    from hessfree.gradients import flat_per_example_grads

    return _engine_loop(model_name, n, lambda view, names: lambda b: flat_per_example_grads(view, names, b))


def case_hf_exact_hooks(model_name, n, tmp):
    import hessfree as hf
    from hessfree.gradients.projected import ProjectedFeatures

    def make(view, names):
        eng = ProjectedFeatures(hf.projections.Factorized(None), view, names)
        return lambda b: eng.features(view, b)

    return _engine_loop(model_name, n, make)


def case_hf_fact_1024(model_name, n, tmp):
    import hessfree as hf

    return _hf_fit(model_name, n, hf.projections.Factorized(1024))


def case_hf_fact_4096(model_name, n, tmp):
    import hessfree as hf

    return _hf_fit(model_name, n, hf.projections.Factorized(4096))


def _checkpoints(model_name, n, tmp, epochs):
    """``epochs`` checkpoints of a short seeded SGD run (saved to ``tmp``) and their learning rate."""
    from hessfree.training import train

    model = make_model(model_name)
    res = train(model, make_data(model_name, n), epochs=epochs, lr=0.05, checkpoints=True, progress=False)
    paths = []
    for i, state in enumerate(res.checkpoints):
        p = Path(tmp) / f"{model_name}_ckpt{i}.pt"
        torch.save(state, p)
        paths.append(str(p))
    return model, paths, res.lrs


def _captum_self(model_name, n, tmp, paths, budget=None):
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    model = make_model(model_name)
    x, y = make_data(model_name, n)

    def load(m, path):
        m.load_state_dict(torch.load(path, weights_only=True))
        return 1.0

    tracin = TracInCP(
        model, TensorDataset(x, y), paths, checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=BATCH, sample_wise_grads_per_batch=True,
    )
    t = time.perf_counter()
    if budget is None:
        tracin.self_influence(outer_loop_by_checkpoints=True)
        return time.perf_counter() - t
    return _timeboxed(lambda s, e: tracin.self_influence(inputs=(x[s:e], y[s:e])), n, budget, t)


def case_captum_tracincp(model_name, n, tmp):
    model = make_model(model_name)
    p = Path(tmp) / f"{model_name}_init.pt"
    torch.save(model.state_dict(), p)
    return _captum_self(model_name, n, tmp, [str(p)], budget=PEER_BUDGET)


def case_trak_featurize(model_name, n, tmp):
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = make_model(model_name).eval()
    x, y = make_data(model_name, n)
    grad_dim = sum(p.numel() for p in model.parameters())
    proj = BasicProjector(grad_dim=grad_dim, proj_dim=1024, seed=0, proj_type=ProjectionType.rademacher, device="cpu")
    traker = TRAKer(
        model=model, task="image_classification", train_set_size=n, save_dir=str(Path(tmp) / "trak"), device="cpu",
        projector=proj, proj_dim=1024, use_half_precision=False, logging_level=40,
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    t = time.perf_counter()
    return _timeboxed(lambda s, e: traker.featurize(batch=(x[s:e], y[s:e]), num_samples=e - s), n, PEER_BUDGET, t)


def case_dattri_tracin(model_name, n, tmp):
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model = make_model(model_name).eval()
    x, y = make_data(model_name, n)

    def loss_func(params, data_target_pair):
        xi, yi = data_target_pair
        out = torch.func.functional_call(model, params, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0).long())

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task=task, weight_list=torch.ones(1), normalized_grad=False, device="cpu")
    t = time.perf_counter()

    def step(s, e):
        attributor.self_attribute(DataLoader(TensorDataset(x[s:e], y[s:e]), batch_size=BATCH, shuffle=False))

    return _timeboxed(step, n, PEER_BUDGET, t)


def case_selfinf_hf(model_name, n, tmp):
    import hessfree as hf

    model, paths, lrs = _checkpoints(model_name, n, tmp, 10)
    data = make_data(model_name, n)
    est = hf.Influence(
        hf.ClassificationTask(model), hf.members.Checkpoints(paths, lrs), batch_size=BATCH,
        projection=hf.projections.Factorized(None), max_cache_bytes=0, progress=False,
    )
    t = time.perf_counter()
    est.fit(data)
    est.self_influence()
    return time.perf_counter() - t


def case_selfinf_captum(model_name, n, tmp):
    _, paths, _ = _checkpoints(model_name, n, tmp, 10)
    return _captum_self(model_name, n, tmp, paths)


class SyntheticDigits(torch.utils.data.Dataset):
    """``n`` synthetic 784-pixel examples generated on the fly (example i from seed i),
    so the data itself takes no memory."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        gen = torch.Generator().manual_seed(int(i))
        return torch.randn(784, generator=gen), int(torch.randint(0, 10, (1,), generator=gen))


def case_store(model_name, n, tmp):
    from torch.utils.data import DataLoader

    import hessfree as hf

    loader = DataLoader(SyntheticDigits(n), batch_size=BATCH, shuffle=False)
    est = hf.Influence(
        hf.ClassificationTask(make_model("mlp_big")), batch_size=BATCH, projection=hf.projections.Factorized(1024),
        store=Path(tmp) / f"store{n}", store_dtype="float16", progress=False,
    )
    t = time.perf_counter()
    est.fit(loader)
    seconds = time.perf_counter() - t
    # what the store's integrity costs: hashing every batch's data, crc32 of every written and read batch
    integrity = est._store.integrity_seconds
    return {"seconds": seconds, "integrity_seconds": integrity, "integrity_share": integrity / seconds}


def case_scoring(model_name, n, tmp):
    """GFLOP/s of (1000 x k) @ (k x n) from an fp16 store (``pairwise``'s block loop) vs torch.mm in memory;
    returns extra fields."""
    from hessfree.scoring import accumulate_scores
    from hessfree.store import GradientStore

    k, q = 1024, 1000
    path = Path(tmp) / "scoring_store"
    store = GradientStore.open(path, {"n": n, "dims": [k], "dtype": "float16"})
    gen = torch.Generator().manual_seed(0)
    records = []
    for s in range(0, n, 8192):
        e = min(s + 8192, n)
        records.append(store.write(0, s, torch.randn(e - s, k, generator=gen), np.zeros(e - s)))
    store.record(0, 0, records)
    store.mark_complete()
    store.release()
    queries = torch.randn(q, k, generator=gen)
    out = torch.empty(n, q, dtype=torch.float64)  # pairwise's (n_train, n_test) scores
    flops = 2.0 * q * k * n
    store = GradientStore.open_existing(path)
    feats = store.rows(0, 0, n).float().clone()  # the same rows held in memory, fp32
    res = torch.empty(n, q)
    t_store, t_mm = [], []
    for _ in range(2):  # interleaved, best of two each: a shared machine's load hits both alike
        t = time.perf_counter()
        accumulate_scores(out, queries, store.blocks(0, 0, n, 8192), 1.0, fresh=True)
        t_store.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.mm(feats, queries.T, out=res)
        t_mm.append(time.perf_counter() - t)
    np.testing.assert_allclose(out[:100].numpy(), res[:100].numpy(), rtol=1e-3, atol=1e-3)
    return {"seconds": min(t_store), "gflops_store": flops / min(t_store) / 1e9, "gflops_mm": flops / min(t_mm) / 1e9}


CASES = {k[5:]: v for k, v in globals().items() if k.startswith("case_")}


def run_one(case: str, model_name: str, n: int, threads: int) -> None:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="hf-bench-") as tmp:
        try:
            out = CASES[case](model_name, n, tmp)
            res = out if isinstance(out, dict) else {"seconds": out}
            res["status"] = "ok"
        except ImportError as e:
            res = {"status": f"skipped: {e}"}
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res))


def spawn(case: str, model_name: str, n: int, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", case, "--model", model_name, "--n", str(n), "--threads", str(threads),
           "--peer-budget", str(PEER_BUDGET), "--vocab", str(LM["vocab"]), "--lm-batch", str(LM["batch"])]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"status": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    res = json.loads(lines[-1][7:])
    res["wall_s"] = time.perf_counter() - t
    if "cpu_seconds" in res and "cpu_examples_per_s" not in res:
        res["cpu_examples_per_s"] = n / res["cpu_seconds"]
    return res


GROUPS = {  # --only: a row is kept when a token names its group, its model or its case
    "mlp": lambda m, c: m == "mlp_big" and c not in ("store", "scoring"),
    "cnn": lambda m, c: m == "cnn",
    "small": lambda m, c: m == "mlp_small",
    "store": lambda m, c: c in ("store", "scoring"),
    "transformer": lambda m, c: m == "gpt2",
    "peers": lambda m, c: c in PEERS,
}
PEERS = ("captum_tracincp", "trak_featurize", "dattri_tracin", "selfinf_captum")


def make_plan(n: int, store_n: int, lm_n: int) -> list[tuple[str, str, int]]:
    plan = [
        (model, case, n)
        for model in ("mlp_big", "cnn")
        for case in ("train_step", "hf_vmap", "hf_exact_hooks", "hf_fact_1024", "hf_fact_4096",
                     "captum_tracincp", "trak_featurize", "dattri_tracin")
    ]
    plan += [("mlp_small", c, n) for c in ("train_step", "hf_vmap", "hf_exact_hooks", "captum_tracincp",
                                            "hf_dense_512", "hf_dense_512_nocache")]
    plan += [("mlp_small", "selfinf_hf", n), ("mlp_small", "selfinf_captum", n)]
    plan += [("mlp_big", "store", store_n), ("mlp_big", "store", 2 * store_n), ("mlp_big", "scoring", 2 * store_n)]
    plan += [("gpt2", "lm_check", LM_CHECK_EXAMPLES), ("gpt2", "train_step", lm_n), ("gpt2", "hf_fact_4096", lm_n),
             ("gpt2", "hf_exact_auto", max(1, lm_n // 4))]
    return plan


def select(plan, only: str | None):
    if not only:
        return plan
    tokens = [t.strip() for t in only.split(",") if t.strip()]
    unknown = [t for t in tokens if t not in GROUPS and t != "gpt2" and not any(t in (m, c) for m, c, _ in plan)]
    if unknown:
        sys.exit(f"--only: unknown {unknown}; groups {sorted(GROUPS)}, or a model / case name")
    return [(m, c, k) for m, c, k in plan if any(t in (m, c) or (t in GROUPS and GROUPS[t](m, c)) for t in tokens)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--n", type=int, default=None, help="examples per MLP / CNN case (default 4000; quick 512)")
    ap.add_argument("--store-n", type=int, default=None, help="store sizes N and 2N (default 100000; quick 10000)")
    ap.add_argument("--lm-n", type=int, default=None, help="transformer examples (default 32; quick 8); exact: a quarter")
    ap.add_argument("--lm-batch", type=int, default=None, help="transformer batch size (default 8; quick 4); exact: half")
    ap.add_argument("--vocab", type=int, default=None, help="transformer vocabulary (default 50257, GPT-2's; quick 8192)")
    ap.add_argument("--only", default=None, help="comma-separated groups (" + ", ".join(GROUPS) + "), models or cases")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per case (1: robust on a shared machine)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case before it is reported as a timeout")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/throughput.json; with "
                    "--only: none unless given); a .txt of the printed table is written next to it")  # fmt: skip
    ap.add_argument("--peer-budget", type=float, default=120, help="seconds per peer case; rate from the batches done")
    ap.add_argument("--one", default=None, help="run one case alone (as the table's subprocesses do), e.g. --one hf_dense_512 or --one scoring")
    ap.add_argument("--model", default="mlp_big", help="the model of --one (default mlp_big)")
    args = ap.parse_args()
    global PEER_BUDGET
    PEER_BUDGET = args.peer_budget
    LM["vocab"] = args.vocab or (8192 if args.quick else 50257)
    LM["batch"] = args.lm_batch or (4 if args.quick else 8)
    if args.one:
        run_one(args.one, args.model, args.n, args.threads)
        return
    n = args.n or (512 if args.quick else 4000)
    store_n = args.store_n or (10_000 if args.quick else 100_000)
    lm_n = args.lm_n or (8 if args.quick else 32)
    plan = select(make_plan(n, store_n, lm_n), args.only)
    out = args.out or (None if args.only else "benchmarks/results/throughput.json")
    lines = [f"threads {args.threads}; batch {BATCH} (MLP / CNN), {LM['batch']} (gpt2: vocab {LM['vocab']}, "
             f"sequence {LM['seq']}; exact at {max(1, LM['batch'] // 2)})", ""]  # fmt: skip
    print(lines[0] + "\n", flush=True)
    rows = []
    t0 = time.perf_counter()
    state0 = source_state()
    for model, case, size in plan:
        res = spawn(case, model, size, args.threads, args.timeout)
        if "seconds" in res and "examples_per_s" not in res:
            res["examples_per_s"] = size / res["seconds"]
        rows.append({"model": model, "case": case, "n": size, **res})
        lines.append(_row(rows[-1]))
        print(lines[-1], flush=True)
    summary = _summary(rows)
    if args.only:  # only the ratios of the rows that ran
        summary = {k: v for k, v in summary.items() if v is not None and v != [None, None, None]}
    lines += [""] + [f"{k}: {v}" for k, v in summary.items()]
    state1 = source_state()
    lines += ["", f"total wall {time.perf_counter() - t0:.0f} s; source {state0['commit']}"
              + (f" + uncommitted {state0['src_uncommitted']}" if state0["src_uncommitted"] else "")
              + ("" if state1 == state0 else f"; CHANGED during the run to {state1}")]  # fmt: skip
    print("\n".join(lines[len(rows) + 2 :]))
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "batch": BATCH, "lm": dict(LM), "lm_n": lm_n, "torch": torch.__version__,
            "cpus": os.cpu_count(), "only": args.only, "argv": sys.argv[1:], "source_start": state0,
            "source_end": state1}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    out.with_suffix(".txt").write_text("\n".join(lines) + f"\n\nwrote {out}\n")
    print(f"\nwrote {out} and {out.with_suffix('.txt')}")


def source_state() -> dict:
    """The commit and the uncommitted files under src/ (others may commit while a run is under way)."""

    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"commit": git("rev-parse", "--short", "HEAD"), "src_uncommitted": (git("status", "--porcelain", "--", "../src") or "").splitlines()}


def _rate(v: float) -> str:
    return f"{v:>10.0f}" if v >= 100 else f"{v:>10.2f}"


def _row(r: dict) -> str:
    eps = _rate(r["examples_per_s"]) if "examples_per_s" in r else f"{'-':>10}"
    secs = f"{r['seconds']:>8.2f}" if "seconds" in r else f"{'-':>8}"
    rss = f"{r.get('peak_rss_mb', 0):>8.0f}"
    extra = f" store {r['gflops_store']:.1f} / mm {r['gflops_mm']:.1f} GFLOP/s" if "gflops_store" in r else ""
    if r.get("check_seconds") and r["model"] == "gpt2":
        extra += f"; steady {r['steady_examples_per_s']:.2f} ex/s (engine check {r['check_seconds']:.1f} s)"
    if "integrity_share" in r:
        extra += f"; data hashes + checksums {r['integrity_seconds']:.2f} s = {100 * r['integrity_share']:.1f}% of the fit"
    if "batch" in r:
        extra += f"; batch {r['batch']}"
    if "max_rel_err" in r:
        extra += (f"; Factorized({r['feature_dim']}) features vs per-example loop of {r['n_params']:,} params: "
                  f"max rel err {r['max_rel_err']:.2e} -> {r['check']}")  # fmt: skip
    return f"{r['model']:<10} {r['case']:<16} {r['n']:>7} {eps} ex/s {secs} s {rss} MB  {r['status']}{extra}"


def _summary(rows: list[dict]) -> dict:
    def get(model, case, key="examples_per_s"):
        for r in rows:
            if r["model"] == model and r["case"] == case and r.get("status") == "ok" and key in r:
                return r[key]
        return None

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 3)

    out = {}
    floors = {"mlp_big": 0.7, "cnn": 0.55}
    for model in ("mlp_big", "cnn"):
        step = get(model, "train_step")
        peers = [get(model, c) for c in ("captum_tracincp", "trak_featurize", "dattri_tracin")]
        best_peer = max([p for p in peers if p is not None], default=None)
        out[f"{model}: fact_4096 / train_step (floor >= {floors[model]})"] = ratio(get(model, "hf_fact_4096"), step)
        out[f"{model}: fact_4096 / train_step, CPU time (cross-check)"] = ratio(
            get(model, "hf_fact_4096", "cpu_examples_per_s"), get(model, "train_step", "cpu_examples_per_s")
        )
        out[f"{model}: fact_4096 / train_step, steady state (without the one-time engine check)"] = ratio(
            get(model, "hf_fact_4096", "steady_examples_per_s"), step
        )
        out[f"{model}: fact_1024 / train_step"] = ratio(get(model, "hf_fact_1024"), step)
        out[f"{model}: fact_4096 / fastest peer"] = ratio(get(model, "hf_fact_4096"), best_peer)
        out[f"{model}: exact_hooks / captum (floor >= 1)"] = ratio(get(model, "hf_exact_hooks"), get(model, "captum_tracincp"))
        out[f"{model}: vmap / captum"] = ratio(get(model, "hf_vmap"), get(model, "captum_tracincp"))
        out[f"{model}: exact_hooks peak MB / captum peak MB (floor < 1)"] = ratio(
            get(model, "hf_exact_hooks", "peak_rss_mb"), get(model, "captum_tracincp", "peak_rss_mb")
        )
    out["mlp_small: self-influence 10 ckpts, hessfree s / captum s (floor <= 0.333)"] = ratio(
        get("mlp_small", "selfinf_hf", "seconds"), get("mlp_small", "selfinf_captum", "seconds")
    )
    stores = [r for r in rows if r["case"] == "store" and "peak_rss_mb" in r]
    if len(stores) == 2:
        a, b = stores
        out["store peak RSS MB (N, 2N) (floor < 1536)"] = [round(a["peak_rss_mb"]), round(b["peak_rss_mb"])]
        out["store peak RSS 2N / N - 1 (floor < 0.10)"] = round(b["peak_rss_mb"] / a["peak_rss_mb"] - 1, 3)
    shares = [round(r["integrity_share"], 4) for r in stores if "integrity_share" in r]
    if shares:
        out["store hashes + checksums / fit time (floor <= 0.05)"] = shares
    out["scoring GFLOP/s store / mm (floor >= 0.5)"] = ratio(get("mlp_big", "scoring", "gflops_store"), get("mlp_big", "scoring", "gflops_mm"))
    step = get("gpt2", "train_step")
    out["gpt2: fact_4096 / train_step, steady state (floor >= 0.5)"] = ratio(get("gpt2", "hf_fact_4096", "steady_examples_per_s"), step)
    out["gpt2: fact_4096 / train_step, steady state, CPU time (cross-check)"] = ratio(
        get("gpt2", "hf_fact_4096", "steady_cpu_examples_per_s"), get("gpt2", "train_step", "cpu_examples_per_s")
    )
    out["gpt2: fact_4096 / train_step, whole fit incl. the one-time engine check"] = ratio(get("gpt2", "hf_fact_4096"), step)
    out["gpt2: exact_auto (half batch) / train_step, steady state"] = ratio(get("gpt2", "hf_exact_auto", "steady_examples_per_s"), step)
    out["gpt2: exact_auto (half batch) / train_step, whole fit"] = ratio(get("gpt2", "hf_exact_auto"), step)
    out["gpt2: peak MB train_step, fact_4096, exact_auto"] = [
        None if v is None else round(v) for v in (get("gpt2", c, "peak_rss_mb") for c in ("train_step", "hf_fact_4096", "hf_exact_auto"))
    ]
    out["gpt2: Factorized features vs per-example loop, max rel err (floor <= 1e-3)"] = get("gpt2", "lm_check", "max_rel_err")
    return out


if __name__ == "__main__":
    main()
