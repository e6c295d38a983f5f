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

Every case runs in its own process, so its peak RSS (``ru_maxrss``, including
the ~0.3 GB of the Python + torch import) is its own. Peers are optional (the
``bench`` extra); a missing peer is reported as skipped.

    python benchmarks/throughput.py            # full run (n = 4000, store 100k/200k)
    python benchmarks/throughput.py --quick    # small sizes, a minute or two
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
    if name == "mlp_big":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    if name == "mlp_small":
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    if name == "cnn":
        return CNN()
    raise ValueError(name)


def make_data(model_name: str, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=gen) if model_name == "cnn" else torch.randn(n, 784, generator=gen)
    return x, torch.randint(0, 10, (n,), generator=gen)


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
    model = make_model(model_name)
    x, y = make_data(model_name, n)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x[:BATCH]), y[:BATCH]).backward()  # warm-up: the steady-state rate is the limit
    t = time.perf_counter()
    for s in range(0, n, BATCH):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[s : s + BATCH]), y[s : s + BATCH]).backward()
    return time.perf_counter() - t


def _hf_fit(model_name, n, projection, members=None, tmp=None):
    import hessfree as hf

    model = make_model(model_name)
    data = make_data(model_name, n)
    est = hf.Influence(hf.ClassificationTask(model), members, batch_size=BATCH, projection=projection, max_cache_bytes=0, progress=False)
    t = time.perf_counter()
    est.fit(data)
    est.self_influence()
    return time.perf_counter() - t


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
    return time.perf_counter() - t


def case_scoring(model_name, n, tmp):
    """GFLOP/s of (1000 x k) @ (k x n) from an fp16 store vs torch.mm in memory; returns extra fields."""
    from hessfree.scoring import stream_scores
    from hessfree.store import GradientStore

    k, q = 1024, 1000
    path = Path(tmp) / "scoring_store"
    store = GradientStore.open(path, {"n": n, "dims": [k], "dtype": "float16"})
    gen = torch.Generator().manual_seed(0)
    for s in range(0, n, 8192):
        e = min(s + 8192, n)
        store.write(0, s, torch.randn(e - s, k, generator=gen), np.zeros(e - s))
    store.record(0, 0, [(0, n)])
    store.mark_complete()
    queries = torch.randn(q, k, generator=gen)
    out = np.empty((q, n), dtype=np.float32, order="F")
    flops = 2.0 * q * k * n
    store = GradientStore.open_existing(path)
    feats = store.rows(0, 0, n)  # the same rows held in memory, fp32
    res = torch.empty(q, n)
    t_store, t_mm = [], []
    for _ in range(2):  # interleaved, best of two each: a shared machine's load hits both alike
        t = time.perf_counter()
        stream_scores(queries, store.blocks(0, 0, n, 8192), out)
        t_store.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.mm(queries, feats.T, out=res)
        t_mm.append(time.perf_counter() - t)
    np.testing.assert_allclose(out[:, :100], res[:, :100].numpy(), rtol=1e-3, atol=1e-3)
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
           "--peer-budget", str(PEER_BUDGET)]
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
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    ap.add_argument("--n", type=int, default=None, help="examples per throughput case (default 4000; quick 512)")
    ap.add_argument("--store-n", type=int, default=None, help="store sizes N and 2N (default 100000; quick 10000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per case (1: robust on a shared machine)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case before it is reported as a timeout")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    ap.add_argument("--peer-budget", type=float, default=120, help="seconds per peer case; rate from the batches done")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="mlp_big", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PEER_BUDGET
    PEER_BUDGET = args.peer_budget
    if args.one:
        run_one(args.one, args.model, args.n, args.threads)
        return
    n = args.n or (512 if args.quick else 4000)
    store_n = args.store_n or (10_000 if args.quick else 100_000)
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
    rows = []
    for model, case, size in plan:
        res = spawn(case, model, size, args.threads, args.timeout)
        if "seconds" in res and "examples_per_s" not in res:
            res["examples_per_s"] = size / res["seconds"]
        rows.append({"model": model, "case": case, "n": size, **res})
        print(_row(rows[-1]), flush=True)
    summary = _summary(rows)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "batch": BATCH, "torch": torch.__version__, "cpus": os.cpu_count()}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    print(f"\nwrote {out}")


def _row(r: dict) -> str:
    eps = f"{r['examples_per_s']:>10.0f}" if "examples_per_s" in r else f"{'-':>10}"
    secs = f"{r['seconds']:>8.2f}" if "seconds" in r else f"{'-':>8}"
    rss = f"{r.get('peak_rss_mb', 0):>8.0f}"
    extra = f" store {r['gflops_store']:.1f} / mm {r['gflops_mm']:.1f} GFLOP/s" if "gflops_store" in r else ""
    return f"{r['model']:<10} {r['case']:<16} {r['n']:>7} {eps} ex/s {secs} s {rss} MB  {r['status']}{extra}"


def _summary(rows: list[dict]) -> dict:
    def get(model, case, key="examples_per_s"):
        for r in rows:
            if r["model"] == model and r["case"] == case and key in r:
                return r[key]
        return None

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 3)

    out = {}
    for model in ("mlp_big", "cnn"):
        step = get(model, "train_step")
        peers = [get(model, c) for c in ("captum_tracincp", "trak_featurize", "dattri_tracin")]
        best_peer = max([p for p in peers if p is not None], default=None)
        out[f"{model}: fact_4096 / train_step (floor >= 0.3)"] = ratio(get(model, "hf_fact_4096"), step)
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
    out["scoring GFLOP/s store / mm (floor >= 0.5)"] = ratio(get("mlp_big", "scoring", "gflops_store"), get("mlp_big", "scoring", "gflops_mm"))
    return out


if __name__ == "__main__":
    main()
