"""CUDA checks: per-example gradients on the GPU equal a per-example autograd loop there, and throughput.

Part 1, conformance on CUDA: every model of the test suite's conformance matrix (tests/_models.py: tiny
GPT-2, BERT, Llama + LoRA, tied Llama, GPT-2 classifier, ViT, T5, a ResNet-style CNN, norms, GRU, LSTM, the
toys) is moved to the GPU with its data; for engines auto / hooks / vmap, with ``projection=None`` and
``Factorized(64)``, the features are compared with a plain autograd loop over the unpadded examples on the
same GPU (relative error per example, worst reported) or the engine's named refusal is recorded. TF32 is
switched off for matmul and cuDNN (fp32 throughout), as on the CPU.

Part 2, throughput on CUDA: a GPT-2-shaped causal LM (6 layers, n_embd 384, 6 heads, sequence 128, vocab
50257, tied embeddings, random weights), every parameter; examples per second of
(a) a training step (forward + backward + AdamW, batch 32), (b) ``Influence.fit`` with ``Factorized(4096)``
into memory (the engine check on the probe included), (c) the steady rate of ``est.features`` on the same
data; and the MLP 784-1024-1024-10 at batch 256 for the same three. Part 3: scoring from a disk store of
200,000 x 1,000 fp32 features (``top_k`` for 256 queries) against ``torch.mm`` of the same shapes on the GPU.

Run (on a machine with a CUDA GPU):  python benchmarks/gpu_check.py --out DIR
Writes DIR/gpu_check.json and DIR/gpu_check.md and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import hessfree as hf  # noqa: E402
from hessfree.data import to_device  # noqa: E402
from hessfree.errors import EngineError  # noqa: E402

DEV = torch.device("cuda")
SIZES = {"lm_n": 256, "mlp_n": 8192, "disk": (200_000, 1000, 256)}


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def conformance() -> list[dict]:
    import _models

    rows = []
    for name in _models.BUILDERS:
        try:
            c = _models.case(name)
        except Exception as err:  # a builder that needs a package this machine lacks
            rows.append({"model": name, "engine": "-", "projection": "-", "result": f"skipped: {err}"})
            continue
        c.model.to(DEV)
        train, examples = to_device(c.train, DEV), [to_device(e, DEV) for e in c.examples]
        params = dict(c.model.named_parameters())
        chosen = [params[n] for n in c.names]
        ref = []
        # the reference runs without cuDNN: its RNN kernels have no backward in eval mode
        with torch.backends.cudnn.flags(enabled=False):
            for ex in examples:
                loss = c.task.per_example_loss(c.model, ex).sum()
                grads = torch.autograd.grad(loss, chosen, allow_unused=True)
                ref.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                      for g, p in zip(grads, chosen)]))
        ref = torch.stack(ref).detach().double().cpu()
        for engine in ("auto", "hooks", "vmap"):
            for proj in ("none", "k64"):
                row = {"model": name, "engine": engine, "projection": proj}
                try:
                    projection = None if proj == "none" else hf.projections.Factorized(64, seed=3)
                    est = hf.Influence(c.task, params=c.params, engine=engine, projection=projection, batch_size=4,
                                       progress=False)
                    est.fit(train)
                    feats = est.features(train).double().cpu()
                    fmap = est.feature_map(0)
                    expected = ref if proj == "none" else fmap.project_flat(ref.float().to(DEV)).double().cpu()
                    rel = ((feats - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
                    row.update(result="equal" if rel <= 1e-4 else "DIFFERS", max_rel_err=rel)
                except EngineError as err:
                    row.update(result="refused (EngineError)", message=str(err)[:160])
                except Exception as err:
                    row.update(result=f"ERROR {type(err).__name__}", message=str(err)[:300])
                    traceback.print_exc()
                rows.append(row)
                print(json.dumps(row), flush=True)
        c.model.to("cpu")
    return rows


def rate(fn, n_examples: int, repeats: int = 3) -> float:
    fn()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return repeats * n_examples / (time.perf_counter() - t0)


def throughput() -> list[dict]:
    import transformers

    rows = []
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=384, n_layer=6, n_head=6,
                                  bos_token_id=0, eos_token_id=0)
    cases = {}
    lm = transformers.GPT2LMHeadModel(cfg).to(DEV)
    ids = torch.randint(0, 50257, (SIZES["lm_n"], 128), device=DEV)
    cases["gpt2-shaped"] = (lm, hf.LanguageModelTask(lm), {"input_ids": ids}, 32, "all")
    mlp = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 10)).to(DEV)
    x, y = torch.randn(SIZES["mlp_n"], 784, device=DEV), torch.randint(0, 10, (SIZES["mlp_n"],), device=DEV)
    cases["mlp-784-1024-1024-10"] = (mlp, hf.ClassificationTask(mlp), (x, y), 256, None)
    for name, (model, task, data, b, params) in cases.items():
        n = (data["input_ids"] if isinstance(data, dict) else data[0]).shape[0]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def batch(s):
            return {k: v[s : s + b] for k, v in data.items()} if isinstance(data, dict) else (data[0][s : s + b], data[1][s : s + b])

        def train_epoch():
            model.train()
            for s in range(0, n, b):
                opt.zero_grad(set_to_none=True)
                task.per_example_loss(model, batch(s)).mean().backward()
                opt.step()
            model.eval()

        r_train = rate(train_epoch, n)
        model.eval()
        est = hf.Influence(task, params=params, projection=hf.projections.Factorized(4096), batch_size=b, progress=False)
        sync()
        t0 = time.perf_counter()
        est.fit(data)
        sync()
        fit_s = time.perf_counter() - t0
        r_feat = rate(lambda: est.features(data), n)
        # the features equal the per-example loop on the GPU: 3 examples
        fmap = est.feature_map(0)
        names = est.param_names(0)
        p = dict(model.named_parameters())
        worst = 0.0
        for i in range(3):
            ex = batch(i)
            ex = {k: v[:1] for k, v in ex.items()} if isinstance(ex, dict) else (ex[0][:1], ex[1][:1])
            g = torch.autograd.grad(task.per_example_loss(model, ex).sum(), [p[k] for k in names], allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p[k]) if gi is None else gi).reshape(-1) for gi, k in zip(g, names)])
            want = fmap.project_flat(flat[None])[0].double().cpu()
            got = est.features(ex)[0].double().cpu()
            worst = max(worst, ((got - want).norm() / want.norm()).item())
        rows.append({"model": name, "batch": b, "n": n, "train_step_ex_per_s": r_train,
                     "fit_factorized4096_ex_per_s": n / fit_s, "features_factorized4096_ex_per_s": r_feat,
                     "ratio_fit_to_train": (n / fit_s) / r_train, "ratio_steady_to_train": r_feat / r_train,
                     "max_rel_err_vs_loop_3ex": worst})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def disk_scoring() -> dict:
    n, k, q = SIZES["disk"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # a store of n x k features: the per-example gradients of a linear least-squares model with k inputs
        lin = torch.nn.Linear(k, 1, bias=False).to(DEV)
        task = hf.RegressionTask(lin)
        x, y = torch.randn(n, k, device=DEV), torch.randn(n, 1, device=DEV)
        est = hf.Influence(task, store=Path(tmp) / "store", batch_size=8192, progress=False)
        sync()
        t0 = time.perf_counter()
        est.fit((x, y))
        sync()
        fit_s = time.perf_counter() - t0
        test = (torch.randn(q, k, device=DEV), torch.randn(q, 1, device=DEV))
        est.top_k(test, 10)
        sync()
        t0 = time.perf_counter()
        est.top_k(test, 10)
        sync()
        topk_s = time.perf_counter() - t0
        a, bm = torch.randn(q, k, device=DEV), torch.randn(n, k, device=DEV)
        torch.mm(a, bm.T)
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, bm.T)
        sync()
        mm_s = (time.perf_counter() - t0) / 10
    flop = 2.0 * n * k * q
    return {"n": n, "k": k, "queries": q, "store_fit_s": fit_s, "top_k_s": topk_s, "mm_s": mm_s,
            "top_k_gflops": flop / topk_s / 1e9, "mm_gflops": flop / mm_s / 1e9,
            "ratio": (flop / topk_s) / (flop / mm_s)}


def fisher() -> dict:
    """``hessian="fisher"`` on the GPU (Gram by addmm, Cholesky there) against numpy on the same features."""
    torch.manual_seed(0)
    n, n_test = SIZES["mlp_n"] // 4, 64
    mlp = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(DEV)
    x, y = torch.randn(n + n_test, 784, device=DEV), torch.randint(0, 10, (n + n_test,), device=DEV)
    train, test = (x[:n], y[:n]), (x[n:], y[n:])
    est = hf.Influence(hf.ClassificationTask(mlp), projection=hf.projections.Factorized(512, seed=1), hessian="fisher",
                       batch_size=256, progress=False).fit(train)
    got = est.pairwise(test)
    phi = est.features(train).double().cpu().numpy()
    q = est.features(test).double().cpu().numpy()
    gram = phi.T @ phi / n
    lam = 0.1 * np.trace(gram) / gram.shape[0]
    want = q @ np.linalg.solve(gram + lam * np.eye(gram.shape[0]), phi.T)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    return {"n": n, "k": phi.shape[1], "feature_device": str(est.features(test).device), "max_rel_err": rel,
            "result": "equal" if rel < 1e-4 else "DIFFERS"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--only", nargs="+", default=["conformance", "fisher", "throughput", "disk"])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks that the script runs")
    args = ap.parse_args()
    global DEV
    if args.cpu_smoke:
        DEV = torch.device("cpu")
        SIZES.update(lm_n=8, mlp_n=512, disk=(4096, 64, 8))
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU path (--cpu-smoke runs it small on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    info = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "torch": torch.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    out: dict = {"info": info}
    t0 = time.perf_counter()
    for part, fn in (("conformance", conformance), ("fisher", fisher), ("throughput", throughput), ("disk", disk_scoring)):
        if part in args.only:
            try:
                out[part] = fn()
            except Exception as err:
                traceback.print_exc()
                out[part] = {"error": f"{type(err).__name__}: {err}"}
            out[f"{part}_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(out, indent=1, default=str))
    lines = [f"# CUDA checks ({info})", ""]
    if isinstance(out.get("conformance"), list):
        rows = out["conformance"]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["result"]] = counts.get(r["result"], 0) + 1
        worst = max((r.get("max_rel_err", 0.0) for r in rows), default=0.0)
        lines += ["## Conformance", "", f"{len(rows)} cases: {counts}; worst relative error {worst:.2e}", ""]
        lines += [f"- {r['model']} {r['engine']} {r['projection']}: {r['result']} {r.get('message', '')}"
                  for r in rows if r["result"] != "equal"]
    if isinstance(out.get("throughput"), list):
        lines += ["", "## Throughput (examples/s)", "", "| model | batch | train step | fit F(4096) | features F(4096) "
                  "| fit/train | steady/train | rel err |", "|---|---|---|---|---|---|---|---|"]
        for r in out["throughput"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['train_step_ex_per_s']:.0f} | "
                         f"{r['fit_factorized4096_ex_per_s']:.0f} | {r['features_factorized4096_ex_per_s']:.0f} | "
                         f"{r['ratio_fit_to_train']:.2f} | {r['ratio_steady_to_train']:.2f} | "
                         f"{r['max_rel_err_vs_loop_3ex']:.1e} |")
    if isinstance(out.get("fisher"), dict):
        lines += ["", "## hessian='fisher' on the GPU against numpy", "", json.dumps(out["fisher"])]
    if isinstance(out.get("disk"), dict):
        lines += ["", "## Disk store scoring", "", json.dumps(out["disk"])]
    text = "\n".join(lines) + "\n"
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    print(json.dumps({k: v for k, v in out.items() if k.endswith("_s")}))


if __name__ == "__main__":
    main()
